"""Block selection for NSA on GPU: importance scores and the top-n, as Pallas (Triton) kernels.

`importance[b, h, t, c] = sum_{q-heads of KV head h} exp(q_t . k_cmp_c * scale - lse_t)` for the
compressed blocks `c` visible to `t` (0 elsewhere): the compressed-attention probabilities summed
over the GQA group, recomputed from the compressed forward's `lse` (one extra QK^T pass, no
`[T, Nc]` logits kept per head). The mapping to selection blocks, the forced blocks (current,
previous, first of the segment) and the top-n follow `pallas_kernels.reference.select_blocks`
exactly, ties included (the lower block index wins, as in `lax.top_k`).

Two routes:
- `select_top_blocks` (when a compressed block is a selection block: `l = d = l'`, VideoNSA's and
  fla's layout): one kernel scores a key tile and merges it into a running top-n held in
  registers, so nothing of size `T x Nc` reaches HBM;
- `block_importance` + `top_blocks` (any `l, d, l'`): the kernel writes the dense importance
  `[B, Hkv, T, Nc]` and XLA maps it to selection blocks (NSA Eq. 9) and takes `lax.top_k`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._compat import TritonCompilerParams, pl
from pallas_kernels.gpu.banded import BandParams, dot, kernel_cdiv, key_tiles, visible
from pallas_kernels.reference import NSAConfig, cmp_to_sel_weights, forced_scores, top_n_slots
from pallas_kernels.reference.segments import segment_starts

Array = jax.Array


def _tile_importance(q_ref, kc_ref, bseg_ref, lse_ref, b, h, j, t0, tpos, segq, p: BandParams,
                     g: int) -> Array:
    """`[bq, bk]` group-summed probabilities of compressed-key tile `j` for queries `tpos`."""
    bq, bk = p.block_q, p.block_k
    kc = kc_ref[b, pl.ds(j * bk, bk), h, :]
    vis = visible(tpos, j * bk + jnp.arange(bk), segq, bseg_ref[b, pl.ds(j * bk, bk)], p)

    def head(i, acc):
        hq = h * g + i
        q = q_ref[b, pl.ds(t0, bq), hq, :]
        lse = lse_ref[b, hq, pl.ds(t0, bq)]
        s = dot(q, kc, trans_b=True) * p.scale
        return acc + jnp.where(vis, jnp.exp(jnp.minimum(s - lse[:, None], 0.0)), 0.0)

    return lax.fori_loop(0, g, head, jnp.zeros((bq, bk), jnp.float32))


def _importance_kernel(q_ref, kc_ref, segq_ref, bseg_ref, lse_ref, out_ref, *, p: BandParams,
                       g: int):
    it, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q, p.block_k
    t0 = it * bq
    tpos = t0 + jnp.arange(bq)
    segq = segq_ref[b, pl.ds(t0, bq)]
    nkt = kc_ref.shape[1] // bk
    _, hi = key_tiles(t0, bq, p, bk, nkt)

    def tile(j, carry):
        acc = _tile_importance(q_ref, kc_ref, bseg_ref, lse_ref, b, h, j, t0, tpos, segq, p, g)
        out_ref[b, h, pl.ds(t0, bq), pl.ds(j * bk, bk)] = acc
        return carry

    def zero(j, carry):
        out_ref[b, h, pl.ds(t0, bq), pl.ds(j * bk, bk)] = jnp.zeros((bq, bk), jnp.float32)
        return carry

    lax.fori_loop(0, hi, tile, 0)
    lax.fori_loop(hi, nkt, zero, 0)


def block_importance(q: Array, k_cmp: Array, lse: Array, seg: Array, blk_seg: Array,
                     p: BandParams) -> Array:
    """`q: [B, T, Hq, D]`, `k_cmp: [B, Nc, Hkv, D]`, `lse: [B, Hq, T]` -> `[B, Hkv, T, Nc]` f32."""
    b, t, hq, _ = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    return pl.pallas_call(
        functools.partial(_importance_kernel, p=p, g=hq // hkv),
        grid=(t // p.block_q, hkv, b),
        out_shape=jax.ShapeDtypeStruct((b, hkv, t, nc), jnp.float32),
        compiler_params=TritonCompilerParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=p.interpret, name="nsa_block_importance",
    )(q, k_cmp, seg, blk_seg, lse)


def top_blocks(imp: Array, seg: Array, t_real: int, g: int, cfg: NSAConfig) -> Array:
    """`imp: [B, Hkv, T, Nc_pad]` importance -> `idx: [B, T, Hkv, n]` int32 (-1 = empty).

    Same rule as the reference: score per selection block, then the current, previous and
    first block of the segment forced (in that priority), candidates are blocks that start at or
    before the query inside its segment, top-n of the rest; `T` is the padded length.
    """
    b, hkv, t, _ = imp.shape
    nc, ns, n = cfg.num_cmp_blocks(t_real), cfg.num_sel_blocks(t), cfg.num_selected
    imp = imp[..., :nc]
    if cfg.block_size == cfg.cmp_block == cfg.cmp_stride:
        score = jnp.pad(imp, [(0, 0)] * 3 + [(0, ns - nc)])
    else:
        w = np.zeros((nc, ns), np.float32)
        w[:, : cfg.num_sel_blocks(t_real)] = cmp_to_sel_weights(t_real, cfg)
        score = jnp.einsum("bhtc,cj->bhtj", imp, jnp.asarray(w))
    cur = (jnp.arange(t) // cfg.block_size)[None, None, :, None]
    first = (segment_starts(seg) // cfg.block_size)[:, None, :, None]
    live = (seg > 0)[:, None, :, None]
    idx = top_n_slots(forced_scores(score, jnp.arange(ns), cur, first, live, g), n)
    return jnp.moveaxis(idx, 1, 2)


# --------------------------------------------------------------------------- fused top-n


def _merge_top(score: Array, c0, vals: Array, ids: Array) -> tuple[Array, Array]:
    """Merges a tile's scores `[R, K]` (block ids `c0 + column`) into the running top-n
    `vals, ids: [R, n]`.

    Repeats "the tile's best beats the top's worst: swap them" while any row still swaps. Tiles
    arrive in ascending block order, so a tie keeps the block already held (lower index), the
    tile's best is its lowest-index maximum (`argmax`) and the worst held is the highest-index
    minimum: the result is `lax.top_k`'s set. After the first tiles few scores beat the n-th
    best, so most tiles take one or two rounds.
    """
    cols, slots = jnp.arange(score.shape[1]), jnp.arange(vals.shape[1])

    def best_and_worst(score, vals, ids):
        smax, sarg = jnp.max(score, axis=1), jnp.argmax(score, axis=1).astype(jnp.int32)
        vmin = jnp.min(vals, axis=1)
        worst = jnp.argmax(jnp.where(vals == vmin[:, None], ids, -2), axis=1).astype(jnp.int32)
        return smax, sarg, vmin, worst

    def swaps(st):
        return jnp.max(jnp.where(st[3] > st[5], 1, 0)) > 0

    def swap(st):
        score, vals, ids, smax, sarg, vmin, worst = st
        take = smax > vmin
        at = (slots[None, :] == worst[:, None]) & take[:, None]
        vals = jnp.where(at, smax[:, None], vals)
        ids = jnp.where(at, c0 + sarg[:, None], ids)
        score = jnp.where((cols[None, :] == sarg[:, None]) & take[:, None], -jnp.inf, score)
        return (score, vals, ids, *best_and_worst(score, vals, ids))

    st = lax.while_loop(swaps, swap, (score, vals, ids, *best_and_worst(score, vals, ids)))
    return st[1], st[2]


def _topn_kernel(q_ref, kc_ref, segq_ref, bseg_ref, lse_ref, first_ref, idx_ref, *,
                 p: BandParams, g: int, block: int, n: int):
    it, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q, p.block_k
    nslot = idx_ref.shape[-1]
    t0 = it * bq
    tpos = t0 + jnp.arange(bq)
    segq = segq_ref[b, pl.ds(t0, bq)]
    first = first_ref[b, pl.ds(t0, bq)]
    cur = lax.div(tpos, block)[:, None]
    # key tiles from the segment start of the tile's first query to its last query's block
    lo = lax.div(jnp.min(first), bk)
    hi = jnp.minimum(kernel_cdiv(lax.div(t0 + bq - 1, block) + 1, bk), kc_ref.shape[1] // bk)

    def tile(j, carry):
        imp = _tile_importance(q_ref, kc_ref, bseg_ref, lse_ref, b, h, j, t0, tpos, segq, p, g)
        score = forced_scores(imp, (j * bk + jnp.arange(bk))[None, :], cur, first[:, None],
                              (segq > 0)[:, None], g)
        return _merge_top(score, j * bk, *carry)

    # slots past n (Triton tiles are powers of two) hold +inf: never the worst, never output
    vals = jnp.where(jnp.arange(nslot)[None, :] < n, -jnp.inf, jnp.inf)
    init = (jnp.broadcast_to(vals, (bq, nslot)).astype(jnp.float32),
            jnp.full((bq, nslot), -1, jnp.int32))
    _, ids = lax.fori_loop(lo, hi, tile, init)
    idx_ref[b, pl.ds(t0, bq), h, :] = ids


def fused_selection_ok(cfg: NSAConfig) -> bool:
    """Whether `select_top_blocks` applies: compressed blocks are the selection blocks."""
    return cfg.block_size == cfg.cmp_block == cfg.cmp_stride and not cfg.videonsa_compat


def select_top_blocks(q: Array, k_cmp: Array, lse: Array, seg: Array, blk_seg: Array,
                      p: BandParams, cfg: NSAConfig) -> Array:
    """Fused importance + top-n: `idx: [B, T, Hkv, n]` int32 (-1 = empty), any slot order.

    `q: [B, T, Hq, D]`, `k_cmp: [B, Nc_pad, Hkv, D]` with `Nc_pad` covering every selection
    block of the padded length `T` in whole key tiles, `lse: [B, Hq, T]`, `seg: [B, T]`,
    `blk_seg: [B, Nc_pad]`; requires `fused_selection_ok(cfg)`.
    """
    if not fused_selection_ok(cfg):
        raise ValueError("select_top_blocks needs compress_block == compress_stride == "
                         f"block_size, got {cfg.cmp_block}, {cfg.cmp_stride}, {cfg.block_size}")
    b, t, hq, _ = q.shape
    ncp, hkv = k_cmp.shape[1], k_cmp.shape[2]
    if ncp < -(-cfg.num_sel_blocks(t) // p.block_k) * p.block_k:
        raise ValueError(f"k_cmp holds {ncp} blocks; the selection over {t} tokens needs "
                         f"{cfg.num_sel_blocks(t)} rounded up to the key tile {p.block_k}")
    n = cfg.num_selected
    slots = 1 << max(0, (n - 1).bit_length())  # Triton tiles are powers of two
    first = segment_starts(seg) // cfg.block_size
    idx = pl.pallas_call(
        functools.partial(_topn_kernel, p=p, g=hq // hkv, block=cfg.block_size, n=n),
        grid=(t // p.block_q, hkv, b),
        out_shape=jax.ShapeDtypeStruct((b, t, hkv, slots), jnp.int32),
        compiler_params=TritonCompilerParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=p.interpret, name="nsa_select_top_blocks",
    )(q, k_cmp, seg, blk_seg, lse, first.astype(jnp.int32))
    return idx[..., :n]

