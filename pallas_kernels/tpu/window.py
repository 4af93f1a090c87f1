"""Sliding-window attention on TPU: banded block-sparse flash attention with a custom_vjp.

Reference: `pallas_kernels.reference.sliding_window_attention` (same outputs and
gradients). Query tile `i` (`block_q` tokens x the GQA group) visits only the key tiles that
intersect its band `[i*block_q - w + 1, (i+1)*block_q - 1]`: at most
`ceil((block_q + w - 1) / block_kv) + 1` tiles, so the work is `O(T * (w + block_q))` instead
of `O(T^2)`. The band lists are static (they depend on T and the sizes only); the mask inside
a tile is `block_sparse.MaskSpec(window=w)` (causal, `w` keys, same segment). The backward
(dq, then dk/dv over the band's (key tile, query tile) pairs without atomics) is
`block_sparse`'s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.numerics import cdiv
from pallas_kernels.reference import checks
from pallas_kernels.reference.segments import as_segments
from pallas_kernels.tiles import WindowBlockSizes
from pallas_kernels.tpu import block_sparse as bs
from pallas_kernels.tpu.tokens import Side, attend_tokens

Array = jax.Array


def band_lists(t: int, window: int, bsz: WindowBlockSizes, b: int, hkv: int) -> bs.FwdLists:
    """Key tiles that intersect each query tile's window band (static)."""
    nq = cdiv(t, bsz.block_q)
    first_q = np.arange(nq) * bsz.block_q
    last_q = np.minimum(first_q + bsz.block_q, t) - 1
    lo = np.maximum(first_q - window + 1, 0) // bsz.block_kv
    return bs.range_lists(lo, last_q // bsz.block_kv, b, hkv)


@functools.partial(jax.jit, static_argnames=("window", "block_sizes", "interpret"))
def sliding_window_attention(
    q: Array,
    k: Array,
    v: Array,
    window: int,
    *,
    segment_ids: Array | None = None,
    block_sizes: WindowBlockSizes | None = None,
    interpret: object = None,
) -> Array:
    """Causal attention over the last `window` tokens: `o [B, T, Hq, D]` in q.dtype.

    `window = 0` turns the branch off (zeros). Differentiable in q, k, v.
    """
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    checks.check_segment_ids(segment_ids, b, t)
    if not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window must be a non-negative integer (0 = off), got {window!r}")
    if window == 0:
        return jnp.zeros_like(q)
    bsz = block_sizes or WindowBlockSizes()
    tokens = Side(as_segments(segment_ids, b, t), jnp.arange(t, dtype=jnp.int32))
    o, _ = attend_tokens(
        q, k, v,
        queries=tokens,
        keys=tokens,
        block_q=bsz.block_q,
        block_kv=bsz.block_kv,
        lists=band_lists(t, window, bsz, b, hkv),
        spec=bs.MaskSpec(window=window),
        interpret=interpret,
        list_budget=bsz.list_budget,
    )  # fmt: skip
    return o
