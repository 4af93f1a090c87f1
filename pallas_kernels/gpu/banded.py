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

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import TritonCompilerParams, pl

Array = jax.Array
_NEG = -1e30


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


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


def _dot(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """f32-accumulating dot; f32 operands use full precision (no tf32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def softmax_init(rows: int, d: int) -> tuple[Array, Array, Array]:
    """Online-softmax state `(acc [rows, d], running max [rows], running sum [rows])`."""
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_step(carry: tuple[Array, Array, Array], q: Array, k: Array, v: Array, vis: Array,
                 scale: float) -> tuple[Array, Array, Array]:
    """Folds one key tile (`k, v: [K, d]`, visibility `vis: [rows, K]`) into the state."""
    acc, m, l = carry
    s = jnp.where(vis, _dot(q, k, trans_b=True) * scale, _NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp(m - m_new)
    e = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
    acc = acc * alpha[:, None] + _dot(e.astype(v.dtype), v)
    return acc, m_new, l * alpha + e.sum(axis=1)


def softmax_finish(carry: tuple[Array, Array, Array]) -> tuple[Array, Array]:
    """`(o [rows, d], lse [rows])`; rows that saw no key get `o = 0`, `lse = -inf`."""
    acc, m, l = carry
    seen = l > 0
    o = acc / jnp.where(seen, l, 1.0)[:, None]
    return o, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def probs_and_ds(q: Array, k: Array, v: Array, do: Array, lse: Array, dl: Array, vis: Array,
                 scale: float) -> tuple[Array, Array]:
    """Backward of one key tile: probabilities `P` and `dS = P * (dO V^T - delta)`, `[rows, K]`
    (rows from the forward's `lse` and `delta = rowsum(dO * O)`; 0 where not visible)."""
    pr = jnp.where(vis, jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
    return pr, pr * (_dot(do, v, trans_b=True) - dl[:, None])


def _key_tiles(t0, bq: int, p: BandParams, bk: int, nkt: int):
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


def _visible(tpos: Array, c: Array, segq: Array, segk: Array, p: BandParams) -> Array:
    """`[bq, bk]` visibility of keys `c` to queries at `tpos` (see module docstring)."""
    pos = (c * p.stride + p.offset)[None, :]
    t = tpos[:, None]
    vis = (pos <= t) & (segk[None, :] == segq[:, None]) & (segq[:, None] > 0)
    if p.window:
        vis &= pos > t - p.window
    return vis


# --------------------------------------------------------------------------- forward


def _fwd_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, o_ref, lse_ref, *, p: BandParams, g: int):
    iq, hq, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q, p.block_k
    h = lax.div(hq, g)
    t0 = iq * bq
    tpos = t0 + jnp.arange(bq)
    q = q_ref[b, pl.ds(t0, bq), hq, :]
    segq = segq_ref[b, pl.ds(t0, bq)]
    lo, hi = _key_tiles(t0, bq, p, bk, k_ref.shape[1] // bk)

    def body(j, carry):
        c = j * bk + jnp.arange(bk)
        k = k_ref[b, pl.ds(j * bk, bk), h, :]
        v = v_ref[b, pl.ds(j * bk, bk), h, :]
        vis = _visible(tpos, c, segq, segk_ref[b, pl.ds(j * bk, bk)], p)
        return softmax_step(carry, q, k, v, vis, p.scale)

    o, lse = softmax_finish(lax.fori_loop(lo, hi, body, softmax_init(bq, q.shape[-1])))
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
    )(q, k, v, seg_q, seg_k)


# --------------------------------------------------------------------------- backward


def _dq_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, dl_ref, dq_ref, *,
               p: BandParams, g: int):
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
    lo, hi = _key_tiles(t0, bq, p, bk, k_ref.shape[1] // bk)

    def body(j, dq):
        c = j * bk + jnp.arange(bk)
        k = k_ref[b, pl.ds(j * bk, bk), h, :]
        v = v_ref[b, pl.ds(j * bk, bk), h, :]
        vis = _visible(tpos, c, segq, segk_ref[b, pl.ds(j * bk, bk)], p)
        _, ds = probs_and_ds(q, k, v, do, lse, dl, vis, p.scale)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[b, pl.ds(t0, bq), hq, :] = (dq * p.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref,
                *, p: BandParams, g: int):
    ik, h, bs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q_bwd, p.block_k_bwd
    b, split = lax.div(bs, p.splits), lax.rem(bs, p.splits)
    c0 = ik * bk
    c = c0 + jnp.arange(bk)
    k = k_ref[b, pl.ds(c0, bk), h, :]
    v = v_ref[b, pl.ds(c0, bk), h, :]
    segk = segk_ref[b, pl.ds(c0, bk)]
    qlo, qhi = _query_tiles(c0, bk, p, bq, q_ref.shape[1] // bq)
    per = _cdiv(jnp.maximum(qhi - qlo, 0), p.splits)
    my_lo = qlo + split * per
    m = jnp.maximum(jnp.minimum(qhi, my_lo + per) - my_lo, 0)

    def body(i, carry):
        dk, dv = carry
        hq = h * g + lax.div(i, m)
        t0 = (my_lo + lax.rem(i, m)) * bq
        tpos = t0 + jnp.arange(bq)
        q = q_ref[b, pl.ds(t0, bq), hq, :]
        do = do_ref[b, pl.ds(t0, bq), hq, :]
        lse = lse_ref[b, hq, pl.ds(t0, bq)]
        dl = dl_ref[b, hq, pl.ds(t0, bq)]
        vis = _visible(tpos, c, segq_ref[b, pl.ds(t0, bq)], segk, p)
        pr, ds = probs_and_ds(q, k, v, do, lse, dl, vis, p.scale)
        dv = dv + _dot(pr.astype(do.dtype), do, trans_a=True)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, g * m, body, (zeros, zeros))
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
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, p=p, g=g),
        grid=(tq // p.block_q_bwd, hq, b),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=cp, interpret=p.interpret, name="nsa_banded_dq",
    )(*args)
    part = jax.ShapeDtypeStruct((p.splits, b, nk, hkv, d), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p, g=g),
        grid=(nk // p.block_k_bwd, hkv, b * p.splits),
        out_shape=[part, part],
        compiler_params=cp, interpret=p.interpret, name="nsa_banded_dkv",
    )(*args)
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
