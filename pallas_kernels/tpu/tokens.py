"""Token-level wrapper around `block_sparse.attend`, shared by every TPU NSA branch.

A branch states its attention in token terms: segments and positions of queries and keys (the
mask is `block_sparse`'s), a key tile size, and for each query tile the key tiles it visits.
This module lays the arrays out for the kernels (`layout`), runs the differentiable kernel
family and maps `(o, lse)` back to `[B, T, Hq, D]` and `[B, T, Hq]`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels._compat import tpu_interpret
from pallas_kernels.numerics import NEG_INF, round_up
from pallas_kernels.tiles import LIST_BUDGET, SUBLANES
from pallas_kernels.tpu import block_sparse as bs
from pallas_kernels.tpu import layout

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Side:
    """Per-token mask inputs of one side: `seg [B, N]` (0 = padding) and `pos [N]` int32."""

    seg: Array
    pos: Array


@dataclasses.dataclass(frozen=True)
class KernelInputs:
    """Everything `block_sparse.attend` takes, in the kernel layout."""

    q: Array
    k: Array
    v: Array
    meta: bs.Meta
    static: bs.Static


def kernel_inputs(
    q: Array,
    k: Array,
    v: Array,
    *,
    queries: Side,
    keys: Side,
    block_q: int,
    block_kv: int,
    lists: bs.FwdLists,
    spec: bs.MaskSpec,
    idx: Array | None = None,
    interpret: object = None,
    list_budget: int = LIST_BUDGET,
) -> KernelInputs:
    """Lays out `q [B, T, Hq, D]`, `k, v [B, N, Hkv, D]` and the mask inputs for the kernels.

    `lists` gives each query tile of `block_q` tokens its key tiles of `block_kv` keys;
    `idx [B, T, Hkv, n]` is the per-token selection when `spec.use_member`; `list_budget`
    bounds the list entries each kernel call holds in SMEM (`tiles.LIST_BUDGET`).
    """
    d, hkv = q.shape[3], k.shape[2]
    g = q.shape[2] // hkv
    dp = layout.padded_head_dim(d)
    kp = round_up(block_kv, SUBLANES)
    q_seg, q_pos = layout.q_meta(queries.seg, queries.pos, block_q, g)
    k_seg, k_pos = layout.k_meta(keys.seg, keys.pos, block_kv, kp)
    rows = None if idx is None else layout.idx_rows(idx.astype(jnp.int32), block_q, g)
    return KernelInputs(
        layout.q_rows(q, hkv, block_q, dp),
        layout.kv_tiles(k, block_kv, kp, dp),
        layout.kv_tiles(v, block_kv, kp, dp),
        bs.Meta(q_seg, q_pos, rows, k_seg, k_pos, lists.kv_list, lists.kv_count, lists.pairs),
        bs.Static(d**-0.5, spec, lists.num_u, tpu_interpret(interpret), list_budget),
    )


def attend_tokens(q: Array, k: Array, v: Array, **kw) -> tuple[Array, Array]:
    """Block-sparse attention (arguments as `kernel_inputs`). Returns `o [B, T, Hq, D]` in
    q.dtype and `lse [B, T, Hq]` f32 (`-inf` where no key is visible), both differentiable in
    q, k, v."""
    t, hq, d = q.shape[1:]
    x = kernel_inputs(q, k, v, **kw)
    o, lse = bs.attend(x.q, x.k, x.v, x.meta, x.static)
    lse = layout.from_rows(lse.swapaxes(-1, -2), t, hq, 1)[..., 0]
    return layout.from_rows(o, t, hq, d), jnp.where(lse > NEG_INF / 2, lse, -jnp.inf)
