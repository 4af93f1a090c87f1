"""Banded flash attention in Pallas (Triton lowering): NSA's compressed and sliding-window
branches, dense causal attention, and dense attention of gathered query rows.

Each is flash attention over keys that sit at known positions: key `c` sits at
`pos(c) = c * stride + offset` and a query at position `t` sees it when `pos(c) <= t`, when
`pos(c) > t - window` (if `window > 0`) and when the segments match (query segment > 0).
- compressed branch: keys are the compressed blocks, `stride = d`, `offset = l - 1` (a block is
  visible once its last token is at or before the query), `window = 0`;
- window branch: keys are the tokens, `stride = 1`, `offset = 0`, `window = w`;
- dense causal attention: `stride = 1`, `offset = 0`, `window = 0`.
Query row `i` sits at position `i` (`banded_attention`) or at `q_pos[i]` (`banded_rows`: a few
rows gathered from anywhere in the sequence, such as a hybrid layer's text rows).

The kernels walk tile ranges computed in XLA from the rows' positions and segments: the key
tiles a query tile may see (`key_tile_ranges`: up to its greatest position, from its least
position minus the window and from the first key of its rows' segments) and the query tiles
that may see a key tile (`query_tile_ranges`: one searchsorted per bound over running extrema
of the tiles' positions, so rows in any order are correct; ascending rows keep the ranges
tight), each with the whole tiles inside it, where the kernels skip the mask.

Shapes (all padded by the caller): `q: [B, Tq, Hq, D]`, `k, v: [B, Nk, Hkv, D]`,
`q_pos, seg_q: [B, Tq]`, `seg_k: [B, Nk]` int32, with `Tq % block_q == 0` and
`Nk % block_k == 0`. Returns `o: [B, Tq, Hq, D]` (q's dtype) and `lse: [B, Hq, Tq]` f32
(`-inf` where nothing is visible, and `o = 0` there). Each query head is one program row; the
KV head is `h // G`. The backward is differentiable in `q, k, v` and also takes the cotangent
of `lse`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import TritonCompilerParams, pl
from pallas_kernels.numerics import NEG_INF

Array = jax.Array
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# beyond every real position and key index: the bounds of a tile without live rows
_FAR = 1 << 30


@dataclasses.dataclass(frozen=True)
class BandParams:
    """Static description of one banded attention call (hashable: used as a jit static)."""

    stride: int
    offset: int
    window: int  # 0 = no lower bound
    scale: float
    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    splits: int = 1  # query-range splits of the dK/dV kernel (partials summed outside)
    num_warps: int = 4
    num_stages: int = 2
    interpret: bool = False


def kernel_cdiv(a: Array, b: int) -> Array:
    """`ceil(a / b)` of non-negative traced ints inside a kernel: `lax.div` truncates, which
    equals floor here and lowers without the sign fix-ups of `//`."""
    return lax.div(a + b - 1, b)


def dot(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """f32-accumulating dot; f32 operands use full precision (no tf32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def softmax_init(rows: int, d: int) -> tuple[Array, Array, Array]:
    """Online-softmax state `(acc [rows, d], running max [rows], running sum [rows])`; the max
    is in log2 units (scores times `log2(e)`, so each exponential is one `exp2`)."""
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_step(carry: tuple[Array, Array, Array], q: Array, k: Array, v: Array,
                 vis: Array | None, scale: float) -> tuple[Array, Array, Array]:
    """Folds one key tile (`k, v: [K, d]`, visibility `vis: [rows, K]`, or `None` when every
    key is visible to every row) into the state."""
    acc, m, l = carry
    s = dot(q, k, trans_b=True) * (scale * _LOG2E)
    if vis is not None:
        s = jnp.where(vis, s, NEG_INF)
    m_new = jnp.maximum(m, s.max(axis=1))
    # a row that has seen no key yet keeps m = NEG_INF: shift it by 0 so its exp2 terms are 0
    shift = jnp.where(m_new > 0.5 * NEG_INF, m_new, 0.0)
    alpha = jnp.exp2(m - shift)
    e = jnp.exp2(s - shift[:, None])
    acc = acc * alpha[:, None] + dot(e.astype(v.dtype), v)
    return acc, m_new, l * alpha + e.sum(axis=1)


def softmax_finish(carry: tuple[Array, Array, Array]) -> tuple[Array, Array]:
    """`(o [rows, d], lse [rows])` (natural log); rows that saw no key get `o = 0`,
    `lse = -inf`."""
    acc, m, l = carry
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)[:, None]
    return o, jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) * _LN2, -jnp.inf)


def probs_and_ds(q: Array, k: Array, v: Array, do: Array, lse: Array, dl: Array,
                 vis: Array | None, scale: float) -> tuple[Array, Array]:
    """Backward of one key tile: probabilities `P` and `dS = P * (dO V^T - delta)`, `[rows, K]`
    (rows from the forward's `lse` and `delta = rowsum(dO * O)`; 0 where not visible;
    `vis=None`: every key visible to every row, so every row's `lse` is finite)."""
    pr = jnp.exp2(dot(q, k, trans_b=True) * (scale * _LOG2E) - (lse * _LOG2E)[:, None])
    if vis is not None:
        pr = jnp.where(vis, pr, 0.0)
    return pr, pr * (dot(do, v, trans_b=True) - dl[:, None])


def key_range(pmin, pmax, p: BandParams, bk: int, nkt: int):
    """Key-tile range `[lo, hi)` holding every key visible to queries at positions
    `pmin .. pmax` (scalars in a kernel, `[B, N]` arrays in XLA)."""
    hi = jnp.where(pmax >= p.offset, lax.div(lax.div(pmax - p.offset, p.stride), bk) + 1, 0)
    hi = jnp.minimum(hi, nkt)
    if p.window == 0:
        return 0 * hi, hi
    x = pmin - p.window - p.offset
    lo = jnp.where(x >= 0, lax.div(lax.div(x, p.stride) + 1, bk), 0)
    return lo, hi


def key_tiles(t0, bq: int, p: BandParams, bk: int, nkt: int):
    """Key-tile range `[lo, hi)` holding every key visible to queries `[t0, t0 + bq)`."""
    return key_range(t0, t0 + bq - 1, p, bk, nkt)


def visible(tpos: Array, c: Array, segq: Array, segk: Array, p: BandParams) -> Array:
    """`[bq, bk]` visibility of keys `c` to queries at `tpos` (see module docstring)."""
    pos = (c * p.stride + p.offset)[None, :]
    t = tpos[:, None]
    vis = (pos <= t) & (segk[None, :] == segq[:, None]) & (segq[:, None] > 0)
    if p.window:
        vis &= pos > t - p.window
    return vis


def _tile_segments(seg: Array, bt: int) -> Array:
    """`[B, N]` segment ids -> `[B, N / bt]`: the tile's segment when all its entries share
    one positive id, else -1."""
    b, n = seg.shape
    s = seg.reshape(b, n // bt, bt)
    u = s[..., 0]
    return jnp.where((s == u[..., None]).all(-1) & (u > 0), u, -1)


def _runs(u: Array) -> tuple[Array, Array]:
    """`u: [B, N]` -> `(first, end) [B, N]`: the run of equal neighbours holding tile `j` is
    `[first[j], end[j])`."""
    n = u.shape[1]
    j = jnp.arange(n, dtype=jnp.int32)
    change = u[:, 1:] != u[:, :-1]
    starts = jnp.concatenate([jnp.ones_like(u[:, :1], bool), change], axis=1)
    ends = jnp.concatenate([change, jnp.ones_like(u[:, :1], bool)], axis=1)
    first = lax.cummax(jnp.where(starts, j, 0), axis=1)
    end = lax.cummin(jnp.where(ends, j + 1, n), axis=1, reverse=True)
    return first, end


def _first_keys(seg_k: Array) -> Array:
    """`[B, Nk + 1]`: the first key holding each segment id `0 .. Nk` (`Nk` where none does).
    Larger ids share entry `Nk`, which then still bounds each of them from below."""
    b, nk = seg_k.shape
    keys = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (b, nk))
    rows = jnp.arange(b)[:, None]
    return jnp.full((b, nk + 1), nk, jnp.int32).at[rows, jnp.clip(seg_k, 0, nk)].min(keys)


class RowTiles(NamedTuple):
    """Per query tile, `[B, Tq / bq]` int32, over its live rows (segment > 0): the least and
    the greatest position, and the first key of any of their segments (`_FAR`, -1, `_FAR` in
    a tile without live rows, so that it bounds nothing)."""

    pmin: Array
    pmax: Array
    first: Array


def row_tiles(q_pos: Array, seg_q: Array, seg_k: Array, bq: int) -> RowTiles:
    """The `RowTiles` of the query tiles of `bq` rows."""
    b, tq = q_pos.shape
    live = seg_q > 0
    first = jnp.take_along_axis(_first_keys(seg_k), jnp.clip(seg_q, 0, seg_k.shape[1]), axis=1)

    def per_tile(x: Array, fill: int, reduce) -> Array:
        return reduce(jnp.where(live, x, fill).reshape(b, tq // bq, bq), axis=-1)

    return RowTiles(per_tile(q_pos, _FAR, jnp.min), per_tile(q_pos, -1, jnp.max),
                    per_tile(first, _FAR, jnp.min))


def key_tile_ranges(q_pos: Array, seg_q: Array, seg_k: Array, p: BandParams, bq: int, bk: int
                    ) -> tuple[Array, Array, Array, Array]:
    """`(lo, hi, a, b) [B, Tq / bq]` int32 for the forward and dQ kernels: query tile `i`
    sees keys only in key tiles `[lo, hi)`, and every query of it sees key tiles `[a, b)`
    whole, so the kernels skip their masks there (`a == b`: none).

    `[lo, hi)` runs from the first key of the tile's rows' segments (and from its least
    position minus the window) to its greatest position. A tile is whole when its last key is
    visible to the tile's least position, its first key to the greatest (window), and queries
    and keys share one segment (one run of uniform tiles, found by `_runs`).
    """
    nkt = seg_k.shape[1] // bk
    rt = row_tiles(q_pos, seg_q, seg_k, bq)
    lo, hi = key_range(rt.pmin, rt.pmax, p, bk, nkt)
    lo = jnp.minimum(jnp.maximum(lo, rt.first // bk), hi)
    uq, uk = _tile_segments(seg_q, bq), _tile_segments(seg_k, bk)
    kfirst, _ = _runs(uk)
    # keys visible to the least position: c <= (pmin - offset) / stride; whole tiles of them
    top = jnp.where(rt.pmin >= p.offset, ((rt.pmin - p.offset) // p.stride + 1) // bk, 0)
    top = jnp.minimum(top, nkt)
    bottom = jnp.zeros_like(top)
    if p.window:  # keys visible to the greatest: c * stride + offset > pmax - window
        x = rt.pmax - p.window - p.offset
        bottom = jnp.where(x >= 0, -(-(x // p.stride + 1) // bk), 0)
    last = jnp.maximum(top - 1, 0)
    same = jnp.take_along_axis(uk, last, 1)
    first = jnp.take_along_axis(kfirst, last, 1)
    ok = (uq > 0) & (same == uq) & (top > bottom)
    a = jnp.where(ok, jnp.maximum(bottom, first), top)
    return tuple(x.astype(jnp.int32) for x in (lo, hi, a, top))


def query_tile_ranges(q_pos: Array, seg_q: Array, seg_k: Array, p: BandParams, bq: int,
                      bk: int) -> tuple[Array, Array, Array, Array]:
    """`(lo, hi, a, b) [B, Nk / bk]` int32 for the dK/dV kernel: key tile `j` is seen only by
    query tiles `[lo, hi)`, and whole by every query of tiles `[a, b)`; the mirror of
    `key_tile_ranges`.

    The running maximum of the tiles' greatest positions (`reach`) and the running minima from
    the right of their least positions (`floor`) and of their segments' first keys (`start`)
    never decrease, so each bound is one searchsorted: the query tiles before the first whose
    `reach` gets to a key see nothing of it, and from the first whose `floor` (or `start`) is
    past it on, every query (or segment) sits after it.
    """
    nqt, nkt = seg_q.shape[1] // bq, seg_k.shape[1] // bk
    rt = row_tiles(q_pos, seg_q, seg_k, bq)
    reach = lax.cummax(rt.pmax, axis=1)
    floor = lax.cummin(rt.pmin, axis=1, reverse=True)
    start = lax.cummin(rt.first, axis=1, reverse=True)
    c0 = jnp.arange(nkt, dtype=jnp.int32) * bk
    p0, p1 = c0 * p.stride + p.offset, (c0 + bk - 1) * p.stride + p.offset

    def first_reaching(x: Array, v: Array, side: str = "left") -> Array:
        """`[B, nkt]`: the first tile whose `x` is `>= v` (`side="right"`: `> v`)."""
        return jax.vmap(functools.partial(jnp.searchsorted, side=side), (0, None))(x, v)

    hi = first_reaching(start, c0 + bk - 1, side="right")
    if p.window:  # from there on every query is at or after the last key + window
        hi = jnp.minimum(hi, first_reaching(floor, p1 + p.window))
    lo = jnp.minimum(first_reaching(reach, p0), hi)
    # whole: every query at or after the last key (and before the first key + window)
    uq, uk = _tile_segments(seg_q, bq), _tile_segments(seg_k, bk)
    _, qend = _runs(uq)
    a = first_reaching(floor, p1)
    top = first_reaching(reach, p0 + p.window) if p.window else jnp.full_like(a, nqt)
    at = jnp.minimum(a, nqt - 1)
    same = jnp.take_along_axis(uq, at, 1)
    end = jnp.take_along_axis(qend, at, 1)
    ok = (uk > 0) & (same == uk) & (top > a)
    b = jnp.where(ok, jnp.minimum(top, end), a)
    return tuple(x.astype(jnp.int32) for x in (lo, hi, a, b))


def _walk_whole(lo: Array, hi: Array, a: Array, b: Array, run, carry):
    """Runs a loop over `[lo, hi)` as `run(r0, r1, masked, carry)` pieces: masked over
    `[lo, a')`, unmasked over `[a', b')`, masked over `[b', hi)`, where `[a', b')` is the
    whole-tile range `[a, b)` clipped into `[lo, hi)`."""
    a = jnp.clip(a, lo, hi)
    b = jnp.clip(b, a, hi)
    carry = run(lo, a, True, carry)
    carry = run(a, b, False, carry)
    return run(b, hi, True, carry)


def _walk_ranges(range_refs, b, i, run, carry):
    """`_walk_whole` over the ranges `(lo, hi, a, b)` of tile `i` in batch row `b`, read from
    the `[B, N]` refs that `key_tile_ranges` / `query_tile_ranges` filled."""
    lo, hi, a, wb = (r[b, i] for r in range_refs)
    return _walk_whole(lo, hi, a, wb, run, carry)


def _key_tile(k_ref, v_ref, segk_ref, b, h, j, bk: int, tpos: Array, segq: Array,
              p: BandParams, masked: bool) -> tuple[Array, Array, Array | None]:
    """K, V `[bk, D]` of key tile `j` and its `[bq, bk]` visibility (None when unmasked)."""
    k = k_ref[b, pl.ds(j * bk, bk), h, :]
    v = v_ref[b, pl.ds(j * bk, bk), h, :]
    vis = (visible(tpos, j * bk + jnp.arange(bk), segq, segk_ref[b, pl.ds(j * bk, bk)], p)
           if masked else None)
    return k, v, vis


# --------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, pos_ref, segq_ref, segk_ref, lo_ref, hi_ref, fa_ref,
                fb_ref, o_ref, lse_ref, *, p: BandParams, g: int):
    iq, hq, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q, p.block_k
    h = lax.div(hq, g)
    t0 = iq * bq
    tpos = pos_ref[b, pl.ds(t0, bq)]
    q = q_ref[b, pl.ds(t0, bq), hq, :]
    segq = segq_ref[b, pl.ds(t0, bq)]

    def run(j0, j1, masked: bool, carry):
        def step(j, carry):
            k, v, vis = _key_tile(k_ref, v_ref, segk_ref, b, h, j, bk, tpos, segq, p, masked)
            return softmax_step(carry, q, k, v, vis, p.scale)
        return lax.fori_loop(j0, j1, step, carry)

    o, lse = softmax_finish(_walk_ranges((lo_ref, hi_ref, fa_ref, fb_ref), b, iq, run,
                                         softmax_init(bq, q.shape[-1])))
    o_ref[b, pl.ds(t0, bq), hq, :] = o.astype(o_ref.dtype)
    lse_ref[b, hq, pl.ds(t0, bq)] = lse


def _forward(q, k, v, q_pos, seg_q, seg_k, p: BandParams) -> tuple[Array, Array]:
    b, tq, hq, d = q.shape
    g = hq // k.shape[2]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, p=p, g=g),
        grid=(tq // p.block_q, hq, b),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, tq), jnp.float32)],
        compiler_params=TritonCompilerParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=p.interpret,
        name="nsa_banded_fwd",
    )(q, k, v, q_pos, seg_q, seg_k,
      *key_tile_ranges(q_pos, seg_q, seg_k, p, p.block_q, p.block_k))


# --------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, pos_ref, segq_ref, segk_ref, do_ref, lse_ref, dl_ref,
               lo_ref, hi_ref, fa_ref, fb_ref, dq_ref, *, p: BandParams, g: int):
    iq, hq, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q_bwd, p.block_k_bwd
    h = lax.div(hq, g)
    t0 = iq * bq
    tpos = pos_ref[b, pl.ds(t0, bq)]
    q = q_ref[b, pl.ds(t0, bq), hq, :]
    do = do_ref[b, pl.ds(t0, bq), hq, :]
    segq = segq_ref[b, pl.ds(t0, bq)]
    lse = lse_ref[b, hq, pl.ds(t0, bq)]
    dl = dl_ref[b, hq, pl.ds(t0, bq)]

    def run(j0, j1, masked: bool, dq):
        def step(j, dq):
            k, v, vis = _key_tile(k_ref, v_ref, segk_ref, b, h, j, bk, tpos, segq, p, masked)
            _, ds = probs_and_ds(q, k, v, do, lse, dl, vis, p.scale)
            return dq + dot(ds.astype(k.dtype), k)
        return lax.fori_loop(j0, j1, step, dq)

    dq = _walk_ranges((lo_ref, hi_ref, fa_ref, fb_ref), b, iq, run,
                      jnp.zeros(q.shape, jnp.float32))
    dq_ref[b, pl.ds(t0, bq), hq, :] = (dq * p.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, pos_ref, segq_ref, segk_ref, do_ref, lse_ref, dl_ref,
                lo_ref, hi_ref, fa_ref, fb_ref, dk_ref, dv_ref, *, p: BandParams, g: int):
    ik, h, bs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q_bwd, p.block_k_bwd
    b, split = lax.div(bs, p.splits), lax.rem(bs, p.splits)
    c0 = ik * bk
    c = c0 + jnp.arange(bk)
    k = k_ref[b, pl.ds(c0, bk), h, :]
    v = v_ref[b, pl.ds(c0, bk), h, :]
    segk = segk_ref[b, pl.ds(c0, bk)]
    qlo, qhi = lo_ref[b, ik], hi_ref[b, ik]
    per = kernel_cdiv(jnp.maximum(qhi - qlo, 0), p.splits)
    my_lo = jnp.minimum(qlo + split * per, qhi)
    my_hi = jnp.minimum(my_lo + per, qhi)

    def walk(r0, r1, masked: bool, carry):
        """Steps over (query head of the group, query tile in `[r0, r1)`)."""
        m = jnp.maximum(r1 - r0, 0)

        def step(i, carry):
            dk, dv = carry
            hq = h * g + lax.div(i, jnp.maximum(m, 1))
            t0 = (r0 + lax.rem(i, jnp.maximum(m, 1))) * bq
            q = q_ref[b, pl.ds(t0, bq), hq, :]
            do = do_ref[b, pl.ds(t0, bq), hq, :]
            lse = lse_ref[b, hq, pl.ds(t0, bq)]
            dl = dl_ref[b, hq, pl.ds(t0, bq)]
            vis = (visible(pos_ref[b, pl.ds(t0, bq)], c, segq_ref[b, pl.ds(t0, bq)], segk, p)
                   if masked else None)
            pr, ds = probs_and_ds(q, k, v, do, lse, dl, vis, p.scale)
            dv = dv + dot(pr.astype(do.dtype), do, trans_a=True)
            dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
            return dk, dv

        return lax.fori_loop(0, g * m, step, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _walk_whole(my_lo, my_hi, fa_ref[b, ik], fb_ref[b, ik], walk, (zeros, zeros))
    dk_ref[split, b, pl.ds(c0, bk), h, :] = dk * p.scale
    dv_ref[split, b, pl.ds(c0, bk), h, :] = dv


def _backward(q, k, v, q_pos, seg_q, seg_k, o, lse, do, dlse, p: BandParams):
    b, tq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    dl = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    cp = TritonCompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)
    args = (q, k, v, q_pos, seg_q, seg_k, do, lse, dl)
    bq, bk = p.block_q_bwd, p.block_k_bwd
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, p=p, g=g),
        grid=(tq // bq, hq, b),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cp, interpret=p.interpret, name="nsa_banded_dq",
    )(*args, *key_tile_ranges(q_pos, seg_q, seg_k, p, bq, bk))
    part = jax.ShapeDtypeStruct((p.splits, b, nk, hkv, d), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p, g=g),
        grid=(nk // bk, hkv, b * p.splits),
        out_shape=[part, part],
        compiler_params=cp, interpret=p.interpret, name="nsa_banded_dkv",
    )(*args, *query_tile_ranges(q_pos, seg_q, seg_k, p, bq, bk))
    return dq, dk.sum(0).astype(k.dtype), dv.sum(0).astype(v.dtype)


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def banded_rows(q: Array, k: Array, v: Array, q_pos: Array, seg_q: Array, seg_k: Array,
                p: BandParams) -> tuple[Array, Array]:
    """Banded flash attention of query rows at positions `q_pos: [B, Tq]` (int32; a row with
    `seg_q <= 0` sees nothing): `(o [B, Tq, Hq, D], lse [B, Hq, Tq] f32)`; see the module
    docstring."""
    return _forward(q, k, v, q_pos, seg_q, seg_k, p)


def _vjp_fwd(q, k, v, q_pos, seg_q, seg_k, p):
    o, lse = _forward(q, k, v, q_pos, seg_q, seg_k, p)
    return (o, lse), (q, k, v, q_pos, seg_q, seg_k, o, lse)


def _vjp_bwd(p, res, cts):
    q, k, v, q_pos, seg_q, seg_k, o, lse = res
    do, dlse = cts
    dq, dk, dv = _backward(q, k, v, q_pos, seg_q, seg_k, o, lse, do, dlse, p)
    return dq, dk, dv, None, None, None


banded_rows.defvjp(_vjp_fwd, _vjp_bwd)


def banded_attention(q: Array, k: Array, v: Array, seg_q: Array, seg_k: Array,
                     p: BandParams) -> tuple[Array, Array]:
    """`banded_rows` with query row `t` at position `t`: `(o [B, Tq, Hq, D], lse [B, Hq, Tq])`."""
    b, tq = seg_q.shape
    pos = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
    return banded_rows(q, k, v, pos, seg_q, seg_k, p)
