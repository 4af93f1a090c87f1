"""Block selection for NSA on GPU: importance scores and a running top-n in one Pallas (Triton)
kernel, so nothing of size `T x Nc` reaches HBM.

`importance[b, h, t, c] = sum_{q-heads of KV head h} exp(q_t . k_cmp_c * scale - lse_t)` for the
compressed blocks `c` visible to `t` (0 elsewhere): the compressed-attention probabilities summed
over the GQA group, recomputed from the compressed forward's `lse` (one extra QK^T pass). The
mapping to selection blocks (NSA Eq. 9), the forced blocks (current, previous, first of the
segment) and the top-n follow `pallas_kernels.reference.select_blocks`; ties between equal
scores go to the lower block index, as in `lax.top_k`.

One program holds a query tile's top-n in registers and walks tiles of `block_k` selection
blocks in ascending order. With `a = l'/d` strides per selection block and `r = l/d` per
compressed block, selection block `j` gathers the compressed blocks `a*j - r + 1 + o` for
`o < a + r - 1`, weighted by how many strides each shares with `j` (`cmp_to_sel_weights`); the
kernel reads them from `a` phase-major copies of the compressed keys (block `a*i + phase` at row
`i`), so offset `o` of a whole tile is one contiguous `[block_k, D]` load and the score of each
block is summed over `o` in ascending compressed-block order. When `l = d = l'` (VideoNSA's and
fla's layout) that is one load per tile and the importance itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._compat import TritonCompilerParams, pl
from pallas_kernels.gpu.banded import BandParams, dot, kernel_cdiv, visible
from pallas_kernels.numerics import cdiv, round_up
from pallas_kernels.reference import NSAConfig, forced_scores
from pallas_kernels.reference.segments import segment_starts

Array = jax.Array


def stride_offsets(cfg: NSAConfig) -> tuple[int, int, tuple[int, ...]]:
    """`(a, r, weights)`: strides per selection block `a = l'/d` and per compressed block
    `r = l/d`, and the Eq. 9 weight of compressed block `a*j - r + 1 + o` in selection block
    `j` for each `o < a + r - 1` (the number of `(m, n)`, `m < a`, `n < r`, with
    `m + n = a + r - 2 - o`; the rows of `reference.cmp_to_sel_weights`)."""
    a, r = cfg.block_size // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    m, n = np.meshgrid(np.arange(a), np.arange(r), indexing="ij")
    return a, r, tuple(int(((m + n) == a + r - 2 - o).sum()) for o in range(a + r - 1))


def _group_probs(q_ref, lse_ref, kc: Array, vis: Array, b, h, t0, p: BandParams, g: int) -> Array:
    """`[bq, K]` compressed-attention probabilities of keys `kc: [K, D]` summed over the
    query heads of KV head `h` (queries `[t0, t0 + bq)`, 0 where `vis` is false)."""
    bq = p.block_q

    def head(i, acc):
        hq = h * g + i
        q = q_ref[b, pl.ds(t0, bq), hq, :]
        lse = lse_ref[b, hq, pl.ds(t0, bq)]
        s = dot(q, kc, trans_b=True) * p.scale
        return acc + jnp.where(vis, jnp.exp(jnp.minimum(s - lse[:, None], 0.0)), 0.0)

    return lax.fori_loop(0, g, head, jnp.zeros(vis.shape, jnp.float32))


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


def _topn_kernel(
    q_ref,
    kc_ref,
    segq_ref,
    bseg_ref,
    lse_ref,
    first_ref,
    idx_ref,
    *,
    p: BandParams,
    g: int,
    block: int,
    n: int,
    a: int,
    r: int,
    weights: tuple[int, ...],
    front: int,
):
    it, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q, p.block_k
    nslot = idx_ref.shape[-1]
    t0 = it * bq
    tpos = t0 + jnp.arange(bq)
    segq = segq_ref[b, pl.ds(t0, bq)]
    first = first_ref[b, pl.ds(t0, bq)]
    cur = lax.div(tpos, block)[:, None]
    # selection tiles from the segment start of the tile's first query to its last query's block
    lo = lax.div(jnp.min(first), bk)
    hi = kernel_cdiv(lax.div(t0 + bq - 1, block) + 1, bk)

    def tile(j, carry):
        blocks = j * bk + jnp.arange(bk)
        score = None
        for o, w in enumerate(weights):  # compressed block a*j - r + 1 + o, ascending
            phase, shift = (o - r + 1) % a, (o - r + 1) // a
            row = j * bk + shift + front
            kc = kc_ref[b, phase, pl.ds(row, bk), h, :]
            vis = visible(tpos, a * blocks - r + 1 + o, segq, bseg_ref[b, phase, pl.ds(row, bk)], p)
            imp = _group_probs(q_ref, lse_ref, kc, vis, b, h, t0, p, g)
            imp = imp if w == 1 else imp * float(w)
            score = imp if score is None else score + imp
        score = forced_scores(score, blocks[None, :], cur, first[:, None], (segq > 0)[:, None], g)
        return _merge_top(score, j * bk, *carry)

    # slots past n (Triton tiles are powers of two) hold +inf: never the worst, never output
    vals = jnp.where(jnp.arange(nslot)[None, :] < n, -jnp.inf, jnp.inf)
    init = (
        jnp.broadcast_to(vals, (bq, nslot)).astype(jnp.float32),
        jnp.full((bq, nslot), -1, jnp.int32),
    )
    _, ids = lax.fori_loop(lo, hi, tile, init)
    idx_ref[b, pl.ds(t0, bq), h, :] = ids


def phase_major(x: Array, a: int, front: int, rows: int, fill) -> Array:
    """`x: [B, N, ...]` compressed blocks -> `[B, a, front + rows, ...]` with block `i` at
    `[:, i % a, front + i // a]`: `front` rows of `fill` ahead (blocks before the first), then
    `x` cut or padded with `fill` to `a * rows` blocks."""
    n = a * rows
    x = x[:, :n]
    pad = [(0, 0), (a * front, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(x.shape[0], front + rows, a, *x.shape[2:])
    return jnp.moveaxis(x, 2, 1)


def select_top_blocks(
    q: Array, k_cmp: Array, lse: Array, seg: Array, blk_seg: Array, p: BandParams, cfg: NSAConfig
) -> Array:
    """Importance + running top-n in one kernel: `idx: [B, T, Hkv, n]` int32 (-1 = empty),
    any slot order; the blocks of `reference.select_blocks` for any `l`, `d`, `l'`.

    `q: [B, T, Hq, D]` padded to a multiple of `p.block_q` and of `l'`, `k_cmp: [B, Nc', Hkv, D]`
    and `blk_seg: [B, Nc']` its compressed keys and their segments (`Nc' >= ceil(T / d)`,
    any padding at segment -1), `lse: [B, Hq, T]`, `seg: [B, T]`; `p`: the compressed branch's
    positions (`stride = d`, `offset = l - 1`) with `block_q` queries and `block_k` selection
    blocks per tile. Not for `videonsa_compat` (fla's top-k, `reference.videonsa_topk`).
    """
    if cfg.videonsa_compat:
        raise ValueError(
            "select_top_blocks: videonsa_compat selects with fla's top-k; use "
            "pallas_kernels.reference.select_blocks"
        )
    b, t, hq, _ = q.shape
    hkv = k_cmp.shape[2]
    if k_cmp.shape[1] < cfg.num_cmp_blocks(t) or blk_seg.shape[1] != k_cmp.shape[1]:
        raise ValueError(
            f"k_cmp / blk_seg hold {k_cmp.shape[1]} / {blk_seg.shape[1]} blocks; "
            f"{t} tokens need {cfg.num_cmp_blocks(t)} in both"
        )
    n = cfg.num_selected
    a, r, weights = stride_offsets(cfg)
    front = cdiv(r - 1, a)  # rows of blocks before the first: offsets reach back r - 1 blocks
    rows = round_up(cfg.num_sel_blocks(t), p.block_k)
    kc = phase_major(k_cmp, a, front, rows, 0)
    bseg = phase_major(blk_seg, a, front, rows, -1)
    slots = 1 << max(0, (n - 1).bit_length())  # Triton tiles are powers of two
    first = segment_starts(seg) // cfg.block_size
    kernel = functools.partial(
        _topn_kernel,
        p=p,
        g=hq // hkv,
        block=cfg.block_size,
        n=n,
        a=a,
        r=r,
        weights=weights,
        front=front,
    )
    idx = pl.pallas_call(
        kernel,
        grid=(t // p.block_q, hkv, b),
        out_shape=jax.ShapeDtypeStruct((b, t, hkv, slots), jnp.int32),
        compiler_params=TritonCompilerParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=p.interpret,
        name="nsa_select_top_blocks",
    )(q, kc, seg, bseg, lse, first.astype(jnp.int32))
    return idx[..., :n]
