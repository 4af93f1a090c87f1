"""Banded flash attention in Pallas (Triton lowering): the compressed and sliding-window branches.

Both branches are flash attention over keys that sit at known positions: key `c` sits at
`pos(c) = c * stride + offset` and query `t` sees it when `pos(c) <= t`, when
`pos(c) > t - window` (if `window > 0`) and when the segments match (query segment > 0).
- compressed branch: keys are the compressed blocks, `stride = d`, `offset = l - 1` (a block is
  visible once its last token is at or before the query), `window = 0`;
- window branch: keys are the tokens, `stride = 1`, `offset = 0`, `window = w`.

Shapes (all padded by the caller): `q: [B, Tq, Hq, D]`, `k, v: [B, Nk, Hkv, D]`,
`seg_q: [B, Tq]`, `seg_k: [B, Nk]` int32, with `Tq % block_q == 0` and `Nk % block_k == 0`.
Returns `o: [B, Tq, Hq, D]` (q's dtype) and `lse: [B, Hq, Tq]` f32 (`-inf` where nothing is
visible, and `o = 0` there). Each query head is one program row; the KV head is `h // G`.
The backward is differentiable in `q, k, v` and also takes the cotangent of `lse`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import TritonCompilerParams, pl
from pallas_kernels.numerics import NEG_INF

Array = jax.Array
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


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


def key_tiles(t0, bq: int, p: BandParams, bk: int, nkt: int):
    """Key-tile range `[lo, hi)` holding every key visible to queries `[t0, t0 + bq)`."""
    t1 = t0 + bq - 1
    hi = jnp.where(t1 >= p.offset, lax.div(lax.div(t1 - p.offset, p.stride), bk) + 1, 0)
    hi = jnp.minimum(hi, nkt)
    if p.window == 0:
        return jnp.int32(0) * t0, hi
    x = t0 - p.window - p.offset
    lo = jnp.where(x >= 0, lax.div(lax.div(x, p.stride) + 1, bk), 0)
    return lo, hi


def _query_tiles(c0, bk: int, p: BandParams, bq: int, nqt: int):
    """Query-tile range `[lo, hi)` of every query that sees a key of `[c0, c0 + bk)`."""
    lo = lax.div(c0 * p.stride + p.offset, bq)
    if p.window == 0:
        return lo, jnp.int32(nqt) + 0 * c0
    last = (c0 + bk - 1) * p.stride + p.offset + p.window - 1
    return lo, jnp.minimum(lax.div(last, bq) + 1, nqt)


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


def full_key_tiles(seg_q: Array, seg_k: Array, p: BandParams, bq: int, bk: int
                   ) -> tuple[Array, Array]:
    """`(a, b) [B, Tq / bq]`: key tiles `[a, b)` that every query of tile `i` sees whole, so
    the forward and dQ kernels skip their masks there (`a == b`: none).

    A tile is whole when its last key is visible to the tile's first query, its first key to
    the tile's last query (window), and queries and keys share one segment (one run of
    uniform tiles, found by `_runs`).
    """
    nqt, nkt = seg_q.shape[1] // bq, seg_k.shape[1] // bk
    uq, uk = _tile_segments(seg_q, bq), _tile_segments(seg_k, bk)
    kfirst, _ = _runs(uk)
    t0 = jnp.arange(nqt, dtype=jnp.int32) * bq
    # keys visible to t0: c <= (t0 - offset) / stride; whole tiles among them
    hi = jnp.where(t0 >= p.offset, ((t0 - p.offset) // p.stride + 1) // bk, 0)
    hi = jnp.minimum(hi, nkt)
    lo = jnp.zeros_like(hi)
    if p.window:  # keys visible to the last query: c * stride + offset > t1 - window
        x = t0 + bq - 1 - p.window - p.offset
        lo = jnp.where(x >= 0, -(-(x // p.stride + 1) // bk), 0)
    last = jnp.maximum(hi - 1, 0)
    same = jnp.take_along_axis(uk, jnp.broadcast_to(last, uq.shape), 1)
    first = jnp.take_along_axis(kfirst, jnp.broadcast_to(last, uq.shape), 1)
    ok = (uq > 0) & (same == uq) & (hi > lo)
    a = jnp.where(ok, jnp.maximum(lo, first), hi)
    return a.astype(jnp.int32), jnp.broadcast_to(hi, a.shape).astype(jnp.int32)


def full_query_tiles(seg_q: Array, seg_k: Array, p: BandParams, bq: int, bk: int
                     ) -> tuple[Array, Array]:
    """`(a, b) [B, Nk / bk]`: query tiles `[a, b)` that see key tile `j` whole (the dK/dV
    kernel's unmasked steps); the mirror of `full_key_tiles`."""
    nqt, nkt = seg_q.shape[1] // bq, seg_k.shape[1] // bk
    uq, uk = _tile_segments(seg_q, bq), _tile_segments(seg_k, bk)
    _, qend = _runs(uq)
    c0 = jnp.arange(nkt, dtype=jnp.int32) * bk
    # the first query tile whose first query sees the tile's last key
    a = jnp.minimum(-(-((c0 + bk - 1) * p.stride + p.offset) // bq), nqt)
    hi = jnp.full_like(a, nqt)
    if p.window:  # the last query still sees the first key: t1 < c0 * stride + offset + window
        hi = jnp.minimum((c0 * p.stride + p.offset + p.window) // bq, nqt)
    at = jnp.broadcast_to(jnp.minimum(a, nqt - 1), uk.shape)
    same = jnp.take_along_axis(uq, at, 1)
    end = jnp.take_along_axis(qend, at, 1)
    ok = (uk > 0) & (same == uk) & (hi > a)
    b = jnp.where(ok, jnp.minimum(hi, end), a)
    return jnp.broadcast_to(a, b.shape).astype(jnp.int32), b.astype(jnp.int32)


def _walk_whole(lo: Array, hi: Array, a: Array, b: Array, run, carry):
    """Runs a loop over `[lo, hi)` as `run(r0, r1, masked, carry)` pieces: masked over
    `[lo, a')`, unmasked over `[a', b')`, masked over `[b', hi)`, where `[a', b')` is the
    whole-tile range `[a, b)` clipped into `[lo, hi)`."""
    a = jnp.clip(a, lo, hi)
    b = jnp.clip(b, a, hi)
    carry = run(lo, a, True, carry)
    carry = run(a, b, False, carry)
    return run(b, hi, True, carry)


def _key_tile(k_ref, v_ref, segk_ref, b, h, j, bk: int, tpos: Array, segq: Array,
              p: BandParams, masked: bool) -> tuple[Array, Array, Array | None]:
    """K, V `[bk, D]` of key tile `j` and its `[bq, bk]` visibility (None when unmasked)."""
    k = k_ref[b, pl.ds(j * bk, bk), h, :]
    v = v_ref[b, pl.ds(j * bk, bk), h, :]
    vis = (visible(tpos, j * bk + jnp.arange(bk), segq, segk_ref[b, pl.ds(j * bk, bk)], p)
           if masked else None)
    return k, v, vis


# --------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, fa_ref, fb_ref, o_ref, lse_ref, *,
                p: BandParams, g: int):
    iq, hq, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q, p.block_k
    h = lax.div(hq, g)
    t0 = iq * bq
    tpos = t0 + jnp.arange(bq)
    q = q_ref[b, pl.ds(t0, bq), hq, :]
    segq = segq_ref[b, pl.ds(t0, bq)]
    lo, hi = key_tiles(t0, bq, p, bk, k_ref.shape[1] // bk)

    def run(j0, j1, masked: bool, carry):
        def step(j, carry):
            k, v, vis = _key_tile(k_ref, v_ref, segk_ref, b, h, j, bk, tpos, segq, p, masked)
            return softmax_step(carry, q, k, v, vis, p.scale)
        return lax.fori_loop(j0, j1, step, carry)

    o, lse = softmax_finish(_walk_whole(lo, hi, fa_ref[b, iq], fb_ref[b, iq], run,
                                        softmax_init(bq, q.shape[-1])))
    o_ref[b, pl.ds(t0, bq), hq, :] = o.astype(o_ref.dtype)
    lse_ref[b, hq, pl.ds(t0, bq)] = lse


def _forward(q, k, v, seg_q, seg_k, p: BandParams) -> tuple[Array, Array]:
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
    )(q, k, v, seg_q, seg_k, *full_key_tiles(seg_q, seg_k, p, p.block_q, p.block_k))


# --------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, dl_ref, fa_ref, fb_ref,
               dq_ref, *, p: BandParams, g: int):
    iq, hq, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q_bwd, p.block_k_bwd
    h = lax.div(hq, g)
    t0 = iq * bq
    tpos = t0 + jnp.arange(bq)
    q = q_ref[b, pl.ds(t0, bq), hq, :]
    do = do_ref[b, pl.ds(t0, bq), hq, :]
    segq = segq_ref[b, pl.ds(t0, bq)]
    lse = lse_ref[b, hq, pl.ds(t0, bq)]
    dl = dl_ref[b, hq, pl.ds(t0, bq)]
    lo, hi = key_tiles(t0, bq, p, bk, k_ref.shape[1] // bk)

    def run(j0, j1, masked: bool, dq):
        def step(j, dq):
            k, v, vis = _key_tile(k_ref, v_ref, segk_ref, b, h, j, bk, tpos, segq, p, masked)
            _, ds = probs_and_ds(q, k, v, do, lse, dl, vis, p.scale)
            return dq + dot(ds.astype(k.dtype), k)
        return lax.fori_loop(j0, j1, step, dq)

    dq = _walk_whole(lo, hi, fa_ref[b, iq], fb_ref[b, iq], run,
                     jnp.zeros(q.shape, jnp.float32))
    dq_ref[b, pl.ds(t0, bq), hq, :] = (dq * p.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, dl_ref, fa_ref, fb_ref,
                dk_ref, dv_ref, *, p: BandParams, g: int):
    ik, h, bs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q_bwd, p.block_k_bwd
    b, split = lax.div(bs, p.splits), lax.rem(bs, p.splits)
    c0 = ik * bk
    c = c0 + jnp.arange(bk)
    k = k_ref[b, pl.ds(c0, bk), h, :]
    v = v_ref[b, pl.ds(c0, bk), h, :]
    segk = segk_ref[b, pl.ds(c0, bk)]
    qlo, qhi = _query_tiles(c0, bk, p, bq, q_ref.shape[1] // bq)
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
            vis = (visible(t0 + jnp.arange(bq), c, segq_ref[b, pl.ds(t0, bq)], segk, p)
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


def _backward(q, k, v, seg_q, seg_k, o, lse, do, dlse, p: BandParams):
    b, tq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    dl = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    cp = TritonCompilerParams(num_warps=p.num_warps, num_stages=p.num_stages)
    args = (q, k, v, seg_q, seg_k, do, lse, dl)
    bq, bk = p.block_q_bwd, p.block_k_bwd
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, p=p, g=g),
        grid=(tq // bq, hq, b),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cp, interpret=p.interpret, name="nsa_banded_dq",
    )(*args, *full_key_tiles(seg_q, seg_k, p, bq, bk))
    part = jax.ShapeDtypeStruct((p.splits, b, nk, hkv, d), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p, g=g),
        grid=(nk // bk, hkv, b * p.splits),
        out_shape=[part, part],
        compiler_params=cp, interpret=p.interpret, name="nsa_banded_dkv",
    )(*args, *full_query_tiles(seg_q, seg_k, p, bq, bk))
    return dq, dk.sum(0).astype(k.dtype), dv.sum(0).astype(v.dtype)


# --------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def banded_attention(q: Array, k: Array, v: Array, seg_q: Array, seg_k: Array,
                     p: BandParams) -> tuple[Array, Array]:
    """Banded flash attention: `(o [B, Tq, Hq, D], lse [B, Hq, Tq] f32)`; see module docstring."""
    return _forward(q, k, v, seg_q, seg_k, p)


def _vjp_fwd(q, k, v, seg_q, seg_k, p):
    o, lse = _forward(q, k, v, seg_q, seg_k, p)
    return (o, lse), (q, k, v, seg_q, seg_k, o, lse)


def _vjp_bwd(p, res, cts):
    q, k, v, seg_q, seg_k, o, lse = res
    do, dlse = cts
    dq, dk, dv = _backward(q, k, v, seg_q, seg_k, o, lse, do, dlse, p)
    return dq, dk, dv, None, None


banded_attention.defvjp(_vjp_fwd, _vjp_bwd)
