"""Dense causal attention with segments and GQA, in O(T) memory on every backend.

Two entry points:
- `dense_attention(q, k, v, segment_ids)`: every row attends to every earlier key of its own
  segment (the layers without NSA, the dense twin). By backend (`implementation=None`):
  GPU: cuDNN when there is one sample and no padding (`segment_ids is None`) and the inputs
  are 16-bit, else the Pallas banded flash kernel with an unbounded window
  (`pallas_kernels.gpu.banded_attention`); TPU and CPU: `"chunked"`, the flash formulation in
  XLA below (splash attention with segment ids comes to TPU with the TPU kernel issue).
- `dense_rows(q_rows, rows, k, v, segment_ids)`: the same attention for a few gathered query
  rows at positions `rows`. By backend: GPU: `"pallas_gpu"`, the same banded kernel given the
  rows' positions (`pallas_kernels.gpu.banded_rows`: each query tile walks the key tiles up
  to its last row, each key tile the query tiles from the first that reaches it); TPU and
  CPU: `"chunked"`. The hybrid layer gathers its text rows into a static number of slots,
  runs them through it and scatters them back (`hybrid.text_attention`).

`chunked_attention` is flash attention written in XLA: keys in chunks of `KEY_CHUNK` under
`lax.scan` with an online softmax; a `custom_vjp` keeps only `o` and the log-sum-exp and
recomputes each chunk's probabilities in the backward, so forward and backward hold
`O(R * KEY_CHUNK)` logits and `O(T)` residuals, never a `[R, T]` or `[T, T]` array. GQA reads
KV head `h // G` without repeating K/V (as the Pallas kernel does).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from pallas_kernels.numerics import NEG_INF, round_up
from pallas_kernels.reference import checks
from pallas_kernels.reference.segments import as_segments

if TYPE_CHECKING:
    from pallas_kernels.gpu import BandParams

Array = jax.Array
KEY_CHUNK = 512  # keys per scan step of the chunked path
IMPLEMENTATIONS = ("cudnn", "pallas_gpu", "chunked")
ROW_IMPLEMENTATIONS = ("pallas_gpu", "chunked")  # cuDNN takes no gathered rows


def key_visibility(q_pos: Array, q_seg: Array, k_seg: Array, start: Array) -> Array:
    """`[B, R, C]`: may query rows at `q_pos` (segment `q_seg`, `[B, R]`) see the keys
    `start .. start + C` (segments `k_seg: [B, C]`)? Causal, same segment, segment > 0."""
    k_pos = start + jnp.arange(k_seg.shape[1], dtype=jnp.int32)
    causal = k_pos[None, None, :] <= q_pos[:, :, None]
    same = k_seg[:, None, :] == q_seg[:, :, None]
    return causal & same & (q_seg[:, :, None] > 0)


def chunk_keys(k: Array, v: Array, k_seg: Array, c: int) -> tuple[Array, ...]:
    """Keys padded to a multiple of `c` and split: `k, v: [N, B, c, Hkv, D]`, `k_seg:
    [N, B, c]` (padding keys in segment 0, seen by no query), starts `[N]`."""
    b, t = k_seg.shape
    tp = round_up(t, c)
    n = tp // c

    def split(x: Array) -> Array:
        x = jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    return split(k), split(v), split(k_seg), jnp.arange(n, dtype=jnp.int32) * c


def group(q: Array, hkv: int) -> Array:
    """`[B, R, Hq, D]` -> `[B, Hkv, G, R, D]` (query head h reads KV head h // G)."""
    b, r, hq, d = q.shape
    return jnp.transpose(q.reshape(b, r, hkv, hq // hkv, d), (0, 2, 3, 1, 4))


def ungroup(x: Array) -> Array:
    """`[B, Hkv, G, R, D]` -> `[B, R, Hq, D]`."""
    b, hkv, g, r, d = x.shape
    return jnp.transpose(x, (0, 3, 1, 2, 4)).reshape(b, r, hkv * g, d)


def chunk_logits(qg: Array, kc: Array, vis: Array, scale: float) -> Array:
    """Scaled f32 logits `[B, Hkv, G, R, C]` of grouped queries against one key chunk
    `kc: [B, C, Hkv, D]`, `NEG_INF` where `vis: [B, R, C]` is False."""
    s = jnp.einsum("bkgrd,bckd->bkgrc", qg, kc, preferred_element_type=jnp.float32) * scale
    return jnp.where(vis[:, None, None], s, NEG_INF)


def flash_forward(q, k, v, q_pos, q_seg, k_seg, key_chunk: int) -> tuple[Array, Array]:
    """`(o [B, R, Hq, D] in q.dtype, lse [B, Hkv, G, R] f32)`; rows that see no key get
    `o = 0` and `lse = 0` (their probabilities are masked to 0 in the backward)."""
    b, r, hq, d = q.shape
    hkv = k.shape[2]
    qg = group(q, hkv)
    scale = d**-0.5

    def step(carry, xs):
        acc, m, l = carry
        kc, vc, sc, start = xs
        vis = key_visibility(q_pos, q_seg, sc, start)
        s = chunk_logits(qg, kc, vis, scale)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(vis[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        pv = jnp.einsum("bkgrc,bckd->bkgrd", p.astype(vc.dtype), vc,
                        preferred_element_type=jnp.float32)
        return (acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)), None

    init = (jnp.zeros((*qg.shape[:-1], d), jnp.float32),
            jnp.full(qg.shape[:-1], NEG_INF, jnp.float32), jnp.zeros(qg.shape[:-1], jnp.float32))
    (acc, m, l), _ = jax.lax.scan(step, init, chunk_keys(k, v, k_seg, key_chunk))
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return ungroup(o).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def chunked_attention(q: Array, k: Array, v: Array, q_pos: Array, q_seg: Array, k_seg: Array,
                      key_chunk: int = KEY_CHUNK) -> Array:
    """Causal attention of query rows `q: [B, R, Hq, D]` at positions `q_pos: [B, R]` (int32)
    in segments `q_seg: [B, R]` over keys `k, v: [B, T, Hkv, D]` at positions `0 .. T-1` in
    segments `k_seg: [B, T]` (0 = padding). Row `i` sees key `j` iff `j <= q_pos[i]` and
    `k_seg[j] == q_seg[i] > 0`; rows that see nothing return zeros. `[B, R, Hq, D]`."""
    return flash_forward(q, k, v, q_pos, q_seg, k_seg, key_chunk)[0]


def chunked_fwd(q, k, v, q_pos, q_seg, k_seg, key_chunk):
    o, lse = flash_forward(q, k, v, q_pos, q_seg, k_seg, key_chunk)
    return o, (q, k, v, q_pos, q_seg, k_seg, o, lse)


def chunked_bwd(key_chunk, res, do):
    q, k, v, q_pos, q_seg, k_seg, o, lse = res
    b, t, hkv, d = k.shape
    scale = d**-0.5
    qg, dog = group(q, hkv), group(do.astype(q.dtype), hkv)
    delta = jnp.einsum("bkgrd,bkgrd->bkgr", group(o, hkv).astype(jnp.float32),
                       dog.astype(jnp.float32))

    def step(dq, xs):
        kc, vc, sc, start = xs
        vis = key_visibility(q_pos, q_seg, sc, start)
        s = chunk_logits(qg, kc, vis, scale)
        p = jnp.where(vis[:, None, None], jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bkgrc,bkgrd->bckd", p.astype(dog.dtype), dog,
                        preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgrd,bckd->bkgrc", dog, vc, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])).astype(q.dtype)
        dq = dq + jnp.einsum("bkgrc,bckd->bkgrd", ds, kc, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkgrc,bkgrd->bckd", ds, qg, preferred_element_type=jnp.float32)
        return dq, (dk * scale, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32),
                                chunk_keys(k, v, k_seg, key_chunk))

    def unchunk(x: Array) -> Array:  # [N, B, C, Hkv, D] -> [B, T, Hkv, D]
        return jnp.moveaxis(x, 0, 1).reshape(b, -1, hkv, d)[:, :t].astype(k.dtype)

    return (ungroup(dq * scale).astype(q.dtype), unchunk(dk), unchunk(dv), None, None, None)


chunked_attention.defvjp(chunked_fwd, chunked_bwd)


def default_implementation(dtype: jnp.dtype, segment_ids: Array | None,
                           gathered: bool = False) -> str:
    """What `implementation=None` runs on the current JAX backend (see the module docstring);
    `gathered`: for `dense_rows`."""
    if jax.default_backend() != "gpu":
        return "chunked"
    if not gathered and segment_ids is None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "pallas_gpu"


def dense_band(d: int) -> BandParams:
    """The banded kernels' parameters for dense causal attention (stride 1, no window) at head
    size `d`: their default tiles, compiled on a GPU and interpreted anywhere else."""
    from pallas_kernels.gpu import BandParams

    return BandParams(stride=1, offset=0, window=0, scale=d**-0.5,
                      interpret=jax.default_backend() != "gpu")


def pad_tokens(x: Array, n: int) -> Array:
    """`x: [B, T, ...]` zero-padded to `[B, n, ...]` (padded segment ids are 0: padding)."""
    return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def banded_dense(q: Array, k: Array, v: Array, seg: Array) -> Array:
    """Dense causal attention through the Pallas GPU banded kernel (stride 1, no window)."""
    from pallas_kernels.gpu import banded_attention

    p = dense_band(q.shape[-1])
    tp = round_up(q.shape[1], max(p.block_q, p.block_k, p.block_q_bwd, p.block_k_bwd))
    segp = pad_tokens(seg, tp)
    return banded_attention(pad_tokens(q, tp), pad_tokens(k, tp), pad_tokens(v, tp), segp, segp,
                            p)[0][:, : q.shape[1]]


def banded_dense_rows(q_rows: Array, q_pos: Array, q_seg: Array, k: Array, v: Array, seg: Array,
                      p: BandParams | None = None) -> Array:
    """`chunked_attention`'s contract through the Pallas GPU banded kernel for rows at
    explicit positions (`pallas_kernels.gpu.banded_rows`): rows and keys zero-padded to whole
    tiles of `p` (default `dense_band`), the padding in segment 0. `[B, R, Hq, D]`."""
    from pallas_kernels.gpu import banded_rows

    p = dense_band(q_rows.shape[-1]) if p is None else p
    r, t = q_rows.shape[1], k.shape[1]
    rp = round_up(r, max(p.block_q, p.block_q_bwd))
    tp = round_up(t, max(p.block_k, p.block_k_bwd))
    q_rows, q_pos, q_seg = (pad_tokens(x, rp) for x in (q_rows, q_pos, q_seg))
    k, v, seg = (pad_tokens(x, tp) for x in (k, v, seg))
    return banded_rows(q_rows, k, v, q_pos, q_seg, seg, p)[0][:, :r]


@functools.partial(jax.jit, static_argnames=("implementation",))
def dense_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    *,
    implementation: str | None = None,
) -> Array:
    """Dense causal attention: `q: [B, T, Hq, D]` over `k, v: [B, T, Hkv, D]` -> `[B, T, Hq, D]`.

    With `segment_ids: [B, T]` (0 = padding) queries attend only within their segment and
    padding queries return zeros. `implementation`: None (by backend, see the module
    docstring), "cudnn" (needs `segment_ids=None`), "pallas_gpu" or "chunked".
    """
    b, t, _, _, _ = checks.check_qkv(q, k, v)
    checks.check_segment_ids(segment_ids, b, t)
    if implementation is None:
        implementation = default_implementation(q.dtype, segment_ids)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "cudnn":
        if segment_ids is not None:
            raise ValueError("cuDNN attention takes no segment ids here; use 'pallas_gpu'")
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    seg = as_segments(segment_ids, b, t)
    if implementation == "pallas_gpu":
        return banded_dense(q, k, v, seg)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return chunked_attention(q, k, v, pos, seg, seg)


def dense_rows(q_rows: Array, rows: Array, k: Array, v: Array,
               segment_ids: Array | None = None, *, implementation: str | None = None,
               band: BandParams | None = None) -> Array:
    """Dense causal attention of gathered query rows: `q_rows: [B, R, Hq, D]` are the queries
    of positions `rows: [B, R]` (int32; `-1` marks an unused slot, which returns zeros) over
    `k, v: [B, T, Hkv, D]`, each row over every earlier key of its own segment.
    `implementation`: None (by backend, see the module docstring), "pallas_gpu" or "chunked";
    `band`: the Pallas kernel's tiles (default `dense_band`; `experiments/row_tiles.py`
    sweeps them). Returns `[B, R, Hq, D]`."""
    if implementation is None:
        implementation = default_implementation(q_rows.dtype, segment_ids, gathered=True)
    if implementation not in ROW_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {ROW_IMPLEMENTATIONS}, got {implementation!r}")
    b, t = k.shape[:2]
    seg = as_segments(segment_ids, b, t)
    live = rows >= 0
    safe = jnp.where(live, rows, 0).astype(jnp.int32)
    q_seg = jnp.where(live, jnp.take_along_axis(seg, safe, axis=1), 0)
    if implementation == "pallas_gpu":
        return banded_dense_rows(q_rows, safe, q_seg, k, v, seg, band)
    return chunked_attention(q_rows, k, v, safe, q_seg, seg)
