"""Query-chunk machinery of the reference: every branch maps over chunks of `C` queries
(`lax.map`), so no `[T, T]` array is ever built; plus the masked softmax they share.

`C` is chosen so a chunk's working set stays under `CHUNK_BUDGET_BYTES` (128 MiB).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.numerics import NEG_INF, cdiv
from pallas_kernels.reference.config import NSAConfig

Array = jax.Array
CHUNK_BUDGET_BYTES = 128 * 2**20


def softmax_scale(d: int) -> float:
    return d**-0.5


def masked_softmax(s: Array, mask: Array) -> tuple[Array, Array]:
    """Softmax of f32 logits `s` over the last axis restricted to `mask`.

    Returns probabilities (0 where masked; all 0 for rows with nothing visible) and the
    log-sum-exp (`-inf` for rows with nothing visible).
    """
    s = jnp.where(mask, s, NEG_INF)
    any_visible = mask.any(-1, keepdims=True)
    m = jnp.where(any_visible, s.max(-1, keepdims=True), 0.0)
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    total = e.sum(-1, keepdims=True)
    p = e / jnp.where(any_visible, total, 1.0)
    lse = jnp.where(any_visible, m + jnp.log(jnp.where(any_visible, total, 1.0)), -jnp.inf)
    return p, lse[..., 0]


def query_chunk_size(t: int, cfg: NSAConfig, per_query_bytes: int) -> int:
    c = max(1, min(cfg.query_chunk, CHUNK_BUDGET_BYTES // max(per_query_bytes, 1)))
    c = 1 << (c.bit_length() - 1)  # a power of two keeps the chunk grid regular
    return min(c, 1 << max(0, (t - 1).bit_length()))


def map_query_chunks(fn: Callable[[Array], tuple[Array, ...]], t: int, c: int) -> tuple:
    """Runs `fn(start)` for query chunks `[start, start + c)` and stitches outputs on axis 1.

    `fn` returns arrays of shape `[B, c, ...]`; the last partial chunk is computed padded and
    trimmed, so T need not be a multiple of `c`. Each chunk is rematerialised in the backward
    pass (`jax.checkpoint`): differentiating the map would otherwise keep every chunk's
    intermediates, e.g. the compressed branch's `[B, T, Hq, Nc]` probabilities, quadratic in T.
    """
    n = cdiv(t, c)
    outs = jax.lax.map(jax.checkpoint(fn, prevent_cse=False), jnp.arange(n, dtype=jnp.int32) * c)
    return tuple(
        jnp.moveaxis(o, 0, 1).reshape(o.shape[1], n * c, *o.shape[3:])[:, :t] for o in outs
    )


def pad_time(x: Array, t_new: int) -> Array:
    return jnp.pad(x, [(0, 0), (0, t_new - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def time_slice(x: Array, start: Array, c: int) -> Array:
    """`x[:, start:start + c]` of an array already padded along time."""
    return jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)


def group_heads(q: Array, hkv: int) -> Array:
    """`[B, C, Hq, D]` -> `[B, C, Hkv, G, D]` (query head h belongs to KV head h // G)."""
    b, c, hq, d = q.shape
    return q.reshape(b, c, hkv, hq // hkv, d)


def cmp_logits(q: Array, k_cmp: Array, start: Array, c: int, hkv: int) -> Array:
    """Scaled f32 logits `[B, C, Hkv, G, Nc]` of a query chunk against compressed keys."""
    qc = group_heads(time_slice(q, start, c).astype(jnp.float32), hkv)
    s = jnp.einsum("bcgkd,bngd->bcgkn", qc, k_cmp.astype(jnp.float32))
    return s * softmax_scale(q.shape[-1])
