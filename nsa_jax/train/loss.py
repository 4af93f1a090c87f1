"""Next-token cross-entropy on answer tokens, from final hidden states, in chunks.

The loss never holds `[B, T, vocab]` logits. The host lists each row's answer positions
(`answer_targets`: the positions whose next token is supervised, padded to a bucket `K`); the
step gathers those rows' hidden states `[B, K, H]` and `chunked_cross_entropy` runs over
chunks of `c` of them, computing `[B, c, vocab]` f32 logits per chunk. Its `custom_vjp`
recomputes each chunk's logits in the backward pass (as MaxText's vocabulary tiling does), so
the residuals are the inputs themselves and memory is `O(B * c * vocab)` whatever `T` is.

The function returns the SUM of the per-token losses; the step divides by the number of
answer tokens of the whole optimiser step (all micro-batches, all shards, all packed samples),
so every answer token weighs the same.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nsa_jax.attention.sequence_parallel import SequenceParallel
from nsa_jax.data.processor import IGNORE

Array = jax.Array


def answer_bucket(n: int, length: int, minimum: int = 4) -> int:
    """Static size `K` for `n` answer tokens in a row of `length`: the next power of two
    (at least `minimum`), capped at `length`. Each slot costs a `vocab`-wide row of logits
    forward and backward whether it holds a token or not: short answers (a word and
    `<|im_end|>`) with 16 slots spent ~40% of a tiny model's step on empty slots."""
    k = max(minimum, 1 << max(0, n - 1).bit_length())
    return int(min(k, length))


def answer_targets(
    labels: np.ndarray, segment_ids: np.ndarray, k: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host side: which positions predict an answer token, and which token.

    Position `t` of a row is counted when `labels[t + 1]` is supervised (not `IGNORE`) and
    `t, t + 1` lie in the same (non-padding) segment.

    Args:
      labels: int `[B, L]`, `IGNORE` outside answers (aligned with `input_ids`, not shifted).
      segment_ids: int `[B, L]`, 0 = padding, 1, 2, ... per packed sample.
      k: slots per row; default `answer_bucket` of the fullest row.

    Returns:
      positions int32 `[B, K]` (0 in empty slots), targets int32 `[B, K]` (0 in empty slots),
      weights float32 `[B, K]` (1 for a real slot, 0 for an empty one).
    """
    labels, seg = np.asarray(labels), np.asarray(segment_ids)
    b, length = labels.shape
    valid = np.zeros((b, length), bool)
    valid[:, :-1] = (labels[:, 1:] != IGNORE) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    counts = valid.sum(1)
    if k is None:
        k = answer_bucket(int(counts.max(initial=0)), length)
    if counts.max(initial=0) > k:
        raise ValueError(f"a row has {counts.max()} answer tokens but only {k} slots")
    positions = np.zeros((b, k), np.int32)
    targets = np.zeros((b, k), np.int32)
    weights = np.zeros((b, k), np.float32)
    for r in range(b):
        idx = np.flatnonzero(valid[r])
        positions[r, : idx.size] = idx
        targets[r, : idx.size] = labels[r, idx + 1]
        weights[r, : idx.size] = 1.0
    return positions, targets, weights


def gather_positions(h: Array, positions: Array,
                     sequence_parallel: SequenceParallel | None = None) -> Array:
    """`h: [B, T, H]`, `positions: [B, K]` -> `[B, K, H]`.

    With `sequence_parallel` (`h`'s tokens sharded over its axis), each shard picks the
    positions that fall in its tokens and a sum over the axis joins them: XLA's own
    partitioning of the gather may bring every shard the whole `[B, T, H]` (and the
    backward's scatter a whole `[B, T, H]` gradient), a row's worth of hidden states per
    chip."""
    if sequence_parallel is None:
        return jnp.take_along_axis(h, positions[..., None], axis=1)
    sp = sequence_parallel
    batch = sp.batch_spec(h.shape[0])

    def local(h: Array, positions: Array) -> Array:  # [b, T/n, H], [b, K] -> [b, K, H]
        n = h.shape[1]
        rel = positions - jax.lax.axis_index(sp.axis) * n
        inside = (rel >= 0) & (rel < n)
        picked = jnp.take_along_axis(h, jnp.clip(rel, 0, n - 1)[..., None], axis=1)
        return jax.lax.psum(jnp.where(inside[..., None], picked, 0), sp.axis)

    return jax.shard_map(local, mesh=sp.mesh, in_specs=(P(batch, sp.axis), P(batch)),
                         out_specs=P(batch))(h, positions)


def _chunks(x: Array, c: int) -> Array:
    """`[B, K, ...]` -> `[K / c, B, c, ...]` (K padded to a multiple of c with zeros)."""
    b, k = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, -k % c)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, -1, c, *x.shape[2:]), 1, 0)


def _unchunk(x: Array, k: int) -> Array:
    """Inverse of `_chunks`: `[n, B, c, ...]` -> `[B, K, ...]`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :k]


def _chunk_logits(h: Array, w: Array) -> Array:
    """`[B, c, H] @ [H, V]` -> f32 `[B, c, V]`."""
    return jnp.einsum("bch,hv->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_cross_entropy(h: Array, w: Array, targets: Array, weights: Array, chunk: int) -> Array:
    """`sum_i weights[i] * (logsumexp(h[i] @ w) - (h[i] @ w)[targets[i]])`, f32 scalar.

    Args:
      h: `[B, K, H]` hidden states (any float dtype; logits accumulate in f32).
      w: `[H, V]` output kernel.
      targets: int32 `[B, K]` token ids.
      weights: f32 `[B, K]` per-token weights (0 for empty slots).
      chunk: tokens per row per chunk; the logits held at once are `[B, chunk, V]`.
    """
    return _ce_forward(h, w, targets, weights, chunk)[0]


def _ce_forward(
    h: Array, w: Array, targets: Array, weights: Array, chunk: int
) -> tuple[Array, Array]:
    k = h.shape[1]
    c = min(chunk, k)

    def body(total: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, Array]:
        hc, tc, wc = xs
        logits = _chunk_logits(hc, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return total + jnp.sum(wc * (lse - picked)), lse

    total, lse = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (_chunks(h, c), _chunks(targets, c), _chunks(weights, c))
    )
    return total, _unchunk(lse, k)


def _ce_fwd(
    h: Array, w: Array, targets: Array, weights: Array, chunk: int
) -> tuple[Array, tuple[Array, ...]]:
    total, lse = _ce_forward(h, w, targets, weights, chunk)
    return total, (h, w, targets, weights, lse)


def _ce_bwd(chunk: int, res: tuple[Array, ...], g: Array) -> tuple[Array | None, ...]:
    h, w, targets, weights, lse = res
    k = h.shape[1]
    c = min(chunk, k)
    vocab = w.shape[1]

    def body(dw: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
        hc, tc, wc, lc = xs
        p = jnp.exp(_chunk_logits(hc, w) - lc[..., None])
        d = (p - jax.nn.one_hot(tc, vocab, dtype=p.dtype)) * (g * wc)[..., None]
        d = d.astype(h.dtype)
        dh = jnp.einsum("bcv,hv->bch", d, w.astype(h.dtype), preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bch,bcv->hv", hc, d, preferred_element_type=jnp.float32)
        return dw, dh.astype(h.dtype)

    xs = (_chunks(h, c), _chunks(targets, c), _chunks(weights, c), _chunks(lse, c))
    dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
    return _unchunk(dh, k), dw.astype(w.dtype), None, None


chunked_cross_entropy.defvjp(_ce_fwd, _ce_bwd)
