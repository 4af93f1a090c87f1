"""Block-sparse flash attention on TPU (Mosaic): the one kernel family behind all NSA branches.

Each NSA branch is flash attention over a *list* of key/value tiles per query tile, and differs
only in the list and the mask (like JAX's splash attention, one kernel serves many masks):

- selected: the list is the union of the selection blocks the tile's tokens picked (built
  from `idx` in XLA, reaching the kernel by scalar prefetch), plus a per-row membership mask;
- sliding window: the list is the band of tiles that intersect the window;
- compressed: the list is the causal prefix of compressed-key tiles.

Layouts (built by `pallas_kernels.tpu.layout`; the query tile holds a whole GQA group so one
K/V fetch serves every head of the group, the NSA paper's group-centric loading):

  q, do:        [B, Hkv, Nq, R, Dp]   R = block_q * G rows, token-major, head-minor
  q_seg, q_pos: [B, Nq, R, 1], [Nq, R, 1] int32 (segment 0 = padding, never attends)
  lse:          [B, Hkv, Nq, 1, R] f32 (rows along lanes: 32 bytes a row in HBM, not 512)
  k, v:         [B, Hkv, Nk, K, Dp]   K keys per tile (padded to the sublane tile)
  k_seg, k_pos: [B, Nk, 1, K], [Nk, 1, K] int32
  idx_rows:     [B, Hkv, Nq, R, n] int32, the selection of each row's token (selected only)

Putting the tile index on a leading axis makes every block's two trailing dims full array
dims, so any tile size is a legal Mosaic block; the wrapper pads tiles to the sublane size.
Inside each kernel call the per-row side inputs (segment, position, lse, delta, selection)
travel packed in one lane-dense `[B, Hkv, Nq, C, R]` array (`pack_rows`, rows along lanes),
transposed to `[R, C]` columns in the kernel: an `[R, 1]` array would fill a 128-lane tile
row of HBM per row (512 bytes, twice a bf16 query row at D = 128; 1.9 GB per branch at 128K).

Mask of row r against key c: `seg_q == seg_k > 0` and `pos_k <= pos_q`, and when
`window > 0` also `pos_k > pos_q - window`, and when `use_member` the row's token selected
the key's tile. Positions are whatever the caller makes them (the compressed branch passes
the last token of each block, and negates both sides for VideoNSA's reversed causality).

Index lists (scalar prefetch, flat int32, at most `budget` entries per kernel call so that
SMEM use is bounded whatever T is; longer lists are walked by a `fori_loop` of calls over
chunks, each writing its part of outputs carried through the loop and aliased in place):
  forward, dq and importance, grid (B, Hkv, Nc, U) over chunks of Nc query tiles starting at
    tile `base`: kv_list [B*Hkv*Nc*U] ascending tiles, the tail after kv_count[B*Hkv*Nc]
    valid entries repeats the last valid tile, so the pipeline sees an unchanged block index
    and skips the fetch while `pl.when` skips the compute. The last chunk starts at
    `Nq - Nc`, so it may recompute (and rewrite, identically) tiles of the one before;
  dk/dv, grid (B, Hkv, P):  the (kv tile, query tile) pairs of the forward lists sorted by kv
    tile (pair_kv, pair_q, pair_count), tail filled the same way, walked in chunks of P pairs.
    Consecutive steps on the same kv tile accumulate into VMEM scratch, which starts from the
    tile's running f32 sum (the carried dk/dv, zeros before the first chunk) and is written
    back on the tile's last pair of the chunk, so dk/dv need no atomics and no [Nk, Nq] dense
    sweep: the work is exactly the forward's pairs (megablox's grouped-matmul pattern).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels._compat import pltpu
from pallas_kernels.lists import distinct_ascending
from pallas_kernels.numerics import NEG_INF, cdiv
from pallas_kernels.operands import aliases, ordered
from pallas_kernels.tiles import LIST_BUDGET

Array = jax.Array
LANES = 128


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static mask options. `window > 0`: band of `window` keys; `use_member`: selected."""

    window: int = 0
    use_member: bool = False


@dataclasses.dataclass(frozen=True)
class PairLists:
    """(kv tile, query tile) pairs sorted by kv tile: `[B*Hkv*P]` each, count `[B*Hkv]`."""

    pair_kv: Array
    pair_q: Array
    pair_count: Array
    num_p: int


@dataclasses.dataclass(frozen=True)
class FwdLists:
    """Per query tile, its kv tiles: `kv_list [B*Hkv*Nq*U]`, `kv_count [B*Hkv*Nq]`.

    `pairs`: the backward's (kv tile, query tile) pairs when they are known without looking at
    the data (static lists, built in NumPy); None: `pair_lists` sorts them in XLA."""

    kv_list: Array
    kv_count: Array
    num_u: int
    pairs: PairLists | None = None


# --------------------------------------------------------------------------- list building


def _fill_tail(sorted_vals: Array, count: Array) -> Array:
    """Replaces entries at or after `count` (last axis) by the last valid one (0 if none)."""
    u = sorted_vals.shape[-1]
    last = jnp.take_along_axis(sorted_vals, jnp.maximum(count - 1, 0)[..., None], -1)
    last = jnp.where(count[..., None] > 0, last, 0)
    return jnp.where(jnp.arange(u) < count[..., None], sorted_vals, last).astype(jnp.int32)


def fwd_lists(raw: Array, num_u: int | None = None) -> FwdLists:
    """`raw [B, Hkv, Nq, M]` kv tiles per query tile, -1 = none, duplicates allowed; the list
    keeps `num_u` slots (default M), enough for the distinct tiles of any query tile."""
    s, count = distinct_ascending(raw)
    s = s[..., : num_u or raw.shape[-1]]
    count = jnp.minimum(count, s.shape[-1])
    filled = _fill_tail(s, count)
    return FwdLists(filled.reshape(-1), count.reshape(-1), s.shape[-1])


def range_lists(lo: np.ndarray, hi: np.ndarray, b: int, hkv: int) -> FwdLists:
    """Contiguous tiles `lo[i] .. hi[i]` (inclusive; none where `hi < lo`) per query tile `i`,
    the same for every batch row and KV head: the band (window) and the causal prefix
    (compressed) lists. `lo`, `hi` are static (`[Nq]` NumPy), so the lists are constants and
    `num_u` is the widest range; so are their backward pairs, sorted here in NumPy: a long
    sort costs XLA:TPU 10-30 s of compile time each (`pair_lists`), constants none."""
    count = np.maximum(hi - lo + 1, 0).astype(np.int32)
    num_u = max(int(count.max()), 1)
    vals = lo[:, None] + np.arange(num_u)[None]
    last = np.where(count > 0, lo + count - 1, 0)
    filled = np.where(np.arange(num_u)[None] < count[:, None], vals, last[:, None])
    nq = lo.shape[0]
    kv_list = np.broadcast_to(filled.astype(np.int32), (b, hkv, nq, num_u))
    kv_count = np.broadcast_to(count, (b, hkv, nq))
    return FwdLists(
        jnp.asarray(kv_list.reshape(-1)),
        jnp.asarray(kv_count.reshape(-1)),
        num_u,
        _static_pairs(filled, count, b, hkv),
    )


def _static_pairs(filled: np.ndarray, count: np.ndarray, b: int, hkv: int) -> PairLists:
    """`pair_lists` of one `[Nq, U]` list shared by every batch row and KV head, in NumPy."""
    nq, u = filled.shape
    valid = np.arange(u)[None] < count[:, None]
    kv = filled[valid]
    qi = np.broadcast_to(np.arange(nq)[:, None], (nq, u))[valid]
    order = np.lexsort((qi, kv))  # by kv tile, then query tile: `pair_lists`' order
    n = order.size
    pkv = np.full(nq * u, kv[order[-1]] if n else 0, np.int32)
    pq = np.full(nq * u, qi[order[-1]] if n else 0, np.int32)
    pkv[:n], pq[:n] = kv[order], qi[order]

    def flat(x: np.ndarray) -> Array:
        return jnp.asarray(np.broadcast_to(x, (b * hkv, *x.shape)).reshape(-1))

    return PairLists(flat(pkv), flat(pq), flat(np.int32(n)), nq * u)


def pair_lists(fwd: FwdLists, b: int, hkv: int, nq: int, nk: int | None = None) -> PairLists:
    """Inverts the forward lists: every valid (query tile, kv tile) pair, sorted by kv tile
    (`fwd.pairs` when the lists carry them).

    One sort, no gathers (at 128K the lists hold millions of pairs per KV head, and XLA's
    argsort + gathers compile for minutes): on one packed int32 key `kv * Nq + q` when the
    number of kv tiles `nk` is given and the key fits, else on the two keys (kv, q)."""
    if fwd.pairs is not None:
        return fwd.pairs
    u = fwd.num_u
    kv = fwd.kv_list.reshape(b, hkv, nq * u)
    qi = jnp.broadcast_to(jnp.repeat(jnp.arange(nq, dtype=jnp.int32), u), kv.shape)
    valid = (jnp.arange(u) < fwd.kv_count.reshape(b, hkv, nq, 1)).reshape(b, hkv, nq * u)
    big = jnp.iinfo(jnp.int32).max  # invalid slots sort last
    if nk is not None and nk * nq < big:
        key = jnp.sort(jnp.where(valid, kv * nq + qi, big), axis=-1)
        skv, sq = key // nq, key % nq
    else:
        skv, sq = jax.lax.sort((jnp.where(valid, kv, big), qi), dimension=-1, num_keys=2)
    count = valid.sum(-1).astype(jnp.int32)
    pkv, pq = _fill_tail(skv, count), _fill_tail(sq, count)
    return PairLists(pkv.reshape(-1), pq.reshape(-1), count.reshape(-1), nq * u)


# --------------------------------------------------------------------------- kernel pieces


def _precision(a: Array) -> jax.lax.Precision:
    """f32 operands multiply in full f32 (Mosaic's fp32 contract precision); bf16 ones at the
    MXU's native precision, whatever `jax_default_matmul_precision` says (Mosaic rejects an
    fp32 contract precision on bf16 operands)."""
    return jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _dot_t(a: Array, b: Array) -> Array:
    """`a @ b.T` with f32 accumulation."""
    return jax.lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=_precision(a), preferred_element_type=jnp.float32
    )


def _dot(a: Array, b: Array) -> Array:
    return jax.lax.dot_general(
        a, b, (((1,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=jnp.float32
    )


def _t_dot(a: Array, b: Array) -> Array:
    """`a.T @ b` with f32 accumulation."""
    return jax.lax.dot_general(
        a, b, (((0,), (0,)), ((), ())), precision=_precision(a), preferred_element_type=jnp.float32
    )


def _mask(qseg, qpos, kseg, kpos, idx, tile, spec: MaskSpec) -> Array:
    """`[R, K]` bool: rows `[R, 1]` against keys `[1, K]` (see the module docstring)."""
    m = (qseg == kseg) & (qseg > 0) & (kpos <= qpos)
    if spec.window:
        m &= kpos > qpos - spec.window
    if spec.use_member:
        m &= (idx == tile).astype(jnp.int32).max(-1, keepdims=True) > 0
    return m


def pack_rows(
    q_seg: Array, q_pos: Array, idx_rows: Array | None, hkv: int, *stats: Array
) -> Array:
    """Per-row side data of the query tiles, rows along lanes: `[B, Hkv, Nq, C, R]` f32.

    Row 0 holds each query row's segment and 1 its position (int32 bit patterns), then `stats`
    (f32, each `B * Hkv * Nq * R` values in row order: lse, delta), then the row's selection
    (int32 bits, selected attention only); C is padded to a multiple of 8 sublanes with -1
    (bits), which no selection matches.
    """
    b, nq, r, _ = q_seg.shape

    def bits(x: Array) -> Array:
        return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.float32)

    cols = [
        jnp.broadcast_to(bits(q_seg)[:, None, :, None, :, 0], (b, hkv, nq, 1, r)),
        jnp.broadcast_to(bits(q_pos)[None, None, :, None, :, 0], (b, hkv, nq, 1, r)),
        *(x.astype(jnp.float32).reshape(b, hkv, nq, 1, r) for x in stats),
    ]
    if idx_rows is not None:
        cols.append(bits(idx_rows).swapaxes(-1, -2))
    c = sum(x.shape[3] for x in cols)
    cols.append(jnp.broadcast_to(bits(jnp.int32(-1)), (b, hkv, nq, -c % 8, r)))
    return jnp.concatenate(cols, 3)


def _unpack(rows: Array, n_stats: int, use_member: bool):
    """`(seg, pos, stats, idx)` columns `[R, 1]` (idx `[R, n]`) of a packed `[C, R]` block."""
    rows = rows.T

    def ints(x: Array) -> Array:
        return jax.lax.bitcast_convert_type(x, jnp.int32)

    stats = [rows[:, 2 + i : 3 + i] for i in range(n_stats)]
    idx = ints(rows[:, 2 + n_stats :]) if use_member else None  # padding columns hold -1
    return ints(rows[:, 0:1]), ints(rows[:, 1:2]), stats, idx


def _side_spec(rows: Array, q_tile) -> pl.BlockSpec:
    """The `[C, R]` block of packed side rows `[B, Hkv, Nq, C, R]` at `q_tile(*grid, *refs)`."""
    return pl.BlockSpec((None, None, None, *rows.shape[3:]), lambda *a: (*q_tile(*a), 0, 0))


def _lse_spec(r: int, q_tile) -> pl.BlockSpec:
    """The `[1, R]` block of `lse [B, Hkv, Nq, 1, R]` at `q_tile(*grid, *refs)`."""
    return pl.BlockSpec((None, None, None, 1, r), lambda *a: (*q_tile(*a), 0, 0))


def _row_spec(r: int, width: int, q_tile) -> pl.BlockSpec:
    """A `[R, width]` block of a `[B, Hkv, Nq, R, width]` array at `q_tile(*grid, *refs)`."""
    return pl.BlockSpec((None, None, None, r, width), lambda *a: (*q_tile(*a), 0, 0))


def _kv_side_specs(kk: int, dp: int, kv_tile) -> list:
    """BlockSpecs of k, v, k_seg, k_pos with `kv_tile(*grid, *refs) -> (b, h, j)`."""
    tile = pl.BlockSpec((None, None, None, kk, dp), lambda *a: (*kv_tile(*a), 0, 0))
    return [
        tile,
        tile,
        pl.BlockSpec((None, None, 1, kk), lambda *a: (kv_tile(*a)[0], kv_tile(*a)[2], 0, 0)),
        pl.BlockSpec((None, 1, kk), lambda *a: (kv_tile(*a)[2], 0, 0)),
    ]


def _use_idx(idx_rows: Array | None, spec: MaskSpec) -> Array | None:
    return idx_rows if spec.use_member else None


# --------------------------------------------------------------------------- chunked calls


def query_chunk(b: int, hkv: int, nq: int, num_u: int, budget: int) -> int:
    """Query tiles per kernel call: its lists (`num_u` entries and a count per tile, batch row
    and KV head, plus the chunk's base) stay within `budget` int32 entries."""
    return max(1, min(nq, (budget - 1) // (b * hkv * (num_u + 1))))


def _over_query_chunks(call, lists: FwdLists, b: int, hkv: int, nq: int, ct: int, init):
    """`call(base [1], kv_list, kv_count, *outs) -> outs` over chunks of `ct` query tiles.

    Chunk `c` starts at `base = min(c * ct, Nq - ct)`; its lists are the forward lists of tiles
    `base .. base + ct - 1`. `outs` (full-size outputs, aliased by `call`) are carried."""
    num_u = lists.num_u
    kv_list = lists.kv_list.reshape(b, hkv, nq, num_u)
    kv_count = lists.kv_count.reshape(b, hkv, nq)

    def body(c: Array, outs):
        base = jnp.minimum(c * ct, nq - ct)

        def sl(a: Array) -> Array:
            return jax.lax.dynamic_slice_in_dim(a, base, ct, 2).reshape(-1)

        return tuple(call(base.reshape(1), sl(kv_list), sl(kv_count), *outs))

    return jax.lax.fori_loop(0, cdiv(nq, ct), body, tuple(init))


def _chunk_q_tile(b_, h, i, u, base, *_):
    return b_, h, base[0] + i


def _chunk_kv_tile(hkv: int, ct: int, num_u: int):
    def kv_tile(b_, h, i, u, base, kv_list, *_):
        return b_, h, kv_list[((b_ * hkv + h) * ct + i) * num_u + u]

    return kv_tile


def _out(shape: tuple[int, ...], dtype, like: Array) -> jax.ShapeDtypeStruct:
    """A kernel output that varies over the mesh axes as `like` does: under `shard_map` with
    `check_vma`, a pallas_call must say so, and its zero-filled carries must vary too
    (`zeros_like`). q, k and v vary alike when sharded over batch rows and KV heads."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _any_specs(n: int) -> list:
    """Specs of `n` aliased output buffers the kernel never reads (left in HBM)."""
    return [pl.BlockSpec(memory_space=pl.ANY)] * n


# each call's operands by name, in order (scalar prefetch first); outputs alias by name
FWD_OPERANDS = ("base", "kv_list", "kv_count", "q", "rows", "k", "v", "k_seg", "k_pos", "o",
                "lse")
DQ_OPERANDS = ("base", "kv_list", "kv_count", "q", "rows", "do", "k", "v", "k_seg", "k_pos",
               "dq")
DKV_OPERANDS = ("pair_kv", "pair_q", "count", "q", "rows", "do", "k", "v", "k_seg", "k_pos",
                "dk", "dv")
IMPORTANCE_OPERANDS = ("base", "kv_list", "kv_count", "proj_start", "q", "rows", "reduce_rows",
                       "k", "k_seg", "k_pos", "proj", "out")


# --------------------------------------------------------------------------- forward


def _fwd_kernel(
    base, kv_list, kv_count, q_ref, rows_ref, k_ref, v_ref, kseg_ref, kpos_ref, _o, _lse,
    o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, spec, hkv, ct, num_u,
):
    b, h, i, u = (pl.program_id(a) for a in range(4))
    flat = (b * hkv + h) * ct + i

    @pl.when(u == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(u < kv_count[flat])
    def _step():
        tile = kv_list[flat * num_u + u]
        qseg, qpos, _, idx = _unpack(rows_ref[...], 0, spec.use_member)
        mask = _mask(qseg, qpos, kseg_ref[...], kpos_ref[...], idx, tile, spec)
        s = jnp.where(mask, _dot_t(q_ref[...], k_ref[...]) * scale, NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(-1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(u == num_u - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0.0
        safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe), NEG_INF).T


def _cost(b: int, hkv: int, steps: int, r: int, kk: int, dp: int, matmuls: int, nbytes: int):
    """XLA's view of one kernel call (its cost_analysis): `matmuls` `[R, K, Dp]` products and
    `R * K` exponentials per grid step, every step counted (an upper bound: lists may end
    early), and the bytes its blocks move."""
    pairs = b * hkv * steps
    return pl.CostEstimate(
        flops=2 * matmuls * pairs * r * kk * dp,
        transcendentals=pairs * r * kk,
        bytes_accessed=nbytes,
    )


def sparse_fwd(
    q: Array,
    q_seg: Array,
    q_pos: Array,
    idx_rows: Array | None,
    k: Array,
    v: Array,
    k_seg: Array,
    k_pos: Array,
    lists: FwdLists,
    *,
    scale: float,
    spec: MaskSpec,
    interpret: object,
    budget: int = LIST_BUDGET,
) -> tuple[Array, Array]:
    """Forward: `o [B, Hkv, Nq, R, Dp]` (q.dtype) and `lse [B, Hkv, Nq, 1, R]` f32."""
    b, hkv, nq, r, dp = q.shape
    kk = k.shape[3]
    rows = pack_rows(q_seg, q_pos, _use_idx(idx_rows, spec), hkv)
    num_u = lists.num_u
    ct = query_chunk(b, hkv, nq, num_u, budget)
    kv_tile = _chunk_kv_tile(hkv, ct, num_u)
    kernel = functools.partial(
        _fwd_kernel, scale=scale, spec=spec, hkv=hkv, ct=ct, num_u=num_u
    )
    steps = ct * num_u
    nbytes = 2 * q.nbytes + rows.nbytes + 2 * b * hkv * steps * kk * dp * k.dtype.itemsize
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, hkv, ct, num_u),
            in_specs=[_row_spec(r, dp, _chunk_q_tile), _side_spec(rows, _chunk_q_tile)]
            + _kv_side_specs(kk, dp, kv_tile)
            + _any_specs(2),
            out_specs=[_row_spec(r, dp, _chunk_q_tile), _lse_spec(r, _chunk_q_tile)],
            scratch_shapes=[
                pltpu.VMEM((r, 1), jnp.float32),
                pltpu.VMEM((r, 1), jnp.float32),
                pltpu.VMEM((r, dp), jnp.float32),
            ],
        ),
        out_shape=[
            _out(q.shape, q.dtype, q),
            _out((b, hkv, nq, 1, r), jnp.float32, q),
        ],
        input_output_aliases=aliases(FWD_OPERANDS, ("o", "lse")),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        cost_estimate=_cost(b, hkv, steps, r, kk, dp, 2, nbytes),
        interpret=interpret,
    )

    def chunk(base, kv_list, kv_count, o, lse):
        return call(*ordered(FWD_OPERANDS, base=base, kv_list=kv_list, kv_count=kv_count, q=q,
                             rows=rows, k=k, v=v, k_seg=k_seg, k_pos=k_pos, o=o, lse=lse))

    init = (jnp.zeros_like(q), jnp.zeros_like(q, jnp.float32, (b, hkv, nq, 1, r)))
    return _over_query_chunks(chunk, lists, b, hkv, nq, ct, init)


# --------------------------------------------------------------------------- backward: dq


def _probs_and_ds(q, do, lse, delta, k, v, mask, scale):
    """Recomputed probabilities `p` and `ds = p * (dp - delta)`, both `[R, K]` f32."""
    s = _dot_t(q, k) * scale
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s - lse, 0.0)), 0.0)
    dp = _dot_t(do, v)
    return p, p * (dp - delta)


def _dq_kernel(
    base, kv_list, kv_count, q_ref, rows_ref, do_ref, k_ref, v_ref, kseg_ref, kpos_ref, _dq,
    dq_ref, acc, *, scale, spec, hkv, ct, num_u,
):
    b, h, i, u = (pl.program_id(a) for a in range(4))
    flat = (b * hkv + h) * ct + i

    @pl.when(u == 0)
    def _init():
        acc[...] = jnp.zeros_like(acc)

    @pl.when(u < kv_count[flat])
    def _step():
        tile = kv_list[flat * num_u + u]
        qseg, qpos, (lse, delta), idx = _unpack(rows_ref[...], 2, spec.use_member)
        mask = _mask(qseg, qpos, kseg_ref[...], kpos_ref[...], idx, tile, spec)
        _, ds = _probs_and_ds(
            q_ref[...], do_ref[...], lse, delta, k_ref[...], v_ref[...], mask, scale
        )
        acc[...] += _dot(ds.astype(k_ref.dtype), k_ref[...])

    @pl.when(u == num_u - 1)
    def _finish():
        dq_ref[...] = (acc[...] * scale).astype(dq_ref.dtype)


def sparse_dq(
    q, q_seg, q_pos, idx_rows, do, lse, delta, k, v, k_seg, k_pos, lists: FwdLists, *,
    scale: float, spec: MaskSpec, interpret: object, budget: int = LIST_BUDGET,
) -> Array:
    """dq `[B, Hkv, Nq, R, Dp]`; `lse` and `delta = rowsum(do * o) - dlse` hold
    `B * Hkv * Nq * R` f32 each, in row order (any shape: `[B, Hkv, Nq, 1, R]`, `[.., R, 1]`)."""
    b, hkv, nq, r, dp = q.shape
    kk = k.shape[3]
    rows = pack_rows(q_seg, q_pos, _use_idx(idx_rows, spec), hkv, lse, delta)
    num_u = lists.num_u
    ct = query_chunk(b, hkv, nq, num_u, budget)
    row = _row_spec(r, dp, _chunk_q_tile)
    kernel = functools.partial(_dq_kernel, scale=scale, spec=spec, hkv=hkv, ct=ct, num_u=num_u)
    steps = ct * num_u
    nbytes = 3 * q.nbytes + rows.nbytes + 2 * b * hkv * steps * kk * dp * k.dtype.itemsize
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, hkv, ct, num_u),
            in_specs=[row, _side_spec(rows, _chunk_q_tile), row]
            + _kv_side_specs(kk, dp, _chunk_kv_tile(hkv, ct, num_u))
            + _any_specs(1),
            out_specs=row,
            scratch_shapes=[pltpu.VMEM((r, dp), jnp.float32)],
        ),
        out_shape=_out(q.shape, q.dtype, q),
        input_output_aliases=aliases(DQ_OPERANDS, ("dq",)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        cost_estimate=_cost(b, hkv, steps, r, kk, dp, 3, nbytes),
        interpret=interpret,
    )

    def chunk(base, kv_list, kv_count, dq):
        return (call(*ordered(DQ_OPERANDS, base=base, kv_list=kv_list, kv_count=kv_count, q=q,
                              rows=rows, do=do, k=k, v=v, k_seg=k_seg, k_pos=k_pos, dq=dq)),)

    (dq,) = _over_query_chunks(chunk, lists, b, hkv, nq, ct, (jnp.zeros_like(q),))
    return dq


# --------------------------------------------------------------------------- backward: dk, dv


def _dkdv_kernel(
    pair_kv, pair_q, pair_count, q_ref, rows_ref, do_ref, k_ref, v_ref, kseg_ref, kpos_ref,
    dk_in, dv_in, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, spec, hkv, num_p,
):
    b, h, p = (pl.program_id(a) for a in range(3))
    flat = b * hkv + h
    base = flat * num_p
    count = pair_count[flat]
    tile = pair_kv[base + p]
    valid = p < count
    # the tail repeats the last valid tile, so only p == 0 starts a run outside the pairs
    first = (p == 0) | (tile != pair_kv[base + jnp.maximum(p - 1, 0)])
    last = (p + 1 == count) | (tile != pair_kv[base + jnp.minimum(p + 1, num_p - 1)])

    @pl.when(first)
    def _init():  # the tile's sum over earlier chunks (zeros before the first)
        dk_acc[...] = dk_in[...]
        dv_acc[...] = dv_in[...]

    @pl.when(valid)
    def _step():
        qseg, qpos, (lse, delta), idx = _unpack(rows_ref[...], 2, spec.use_member)
        mask = _mask(qseg, qpos, kseg_ref[...], kpos_ref[...], idx, tile, spec)
        q, do = q_ref[...], do_ref[...]
        pr, ds = _probs_and_ds(q, do, lse, delta, k_ref[...], v_ref[...], mask, scale)
        dv_acc[...] += _t_dot(pr.astype(do.dtype), do)
        dk_acc[...] += _t_dot(ds.astype(q.dtype), q)

    # a chunk without pairs for (b, h) still writes its block back: pass the sum through
    @pl.when((valid & last) | ((count == 0) & (p == 0)))
    def _write():
        dk_ref[...] = dk_acc[...]
        dv_ref[...] = dv_acc[...]


def pair_chunk(b: int, hkv: int, num_p: int, budget: int) -> int:
    """Pairs per dk/dv call: `pair_kv`, `pair_q` and the counts stay within `budget`."""
    return max(1, min(num_p, (budget - b * hkv) // (2 * b * hkv)))


def sparse_dkdv(
    q, q_seg, q_pos, idx_rows, do, lse, delta, k, v, k_seg, k_pos, pairs: PairLists, *,
    scale: float, spec: MaskSpec, interpret: object, budget: int = LIST_BUDGET,
) -> tuple[Array, Array]:
    """dk, dv `[B, Hkv, Nk, K, Dp]` in k.dtype (lse, delta as `sparse_dq`), one pass over the
    sorted pairs (in chunks of `pair_chunk` pairs, accumulating in f32 buffers carried from
    chunk to chunk)."""
    b, hkv, nq, r, dp = q.shape
    kk = k.shape[3]
    rows = pack_rows(q_seg, q_pos, _use_idx(idx_rows, spec), hkv, lse, delta)
    pc = pair_chunk(b, hkv, pairs.num_p, budget)
    nch = cdiv(pairs.num_p, pc)

    def q_tile(b_, h, p, pair_kv, pair_q, pair_count):
        return b_, h, pair_q[(b_ * hkv + h) * pc + p]

    def kv_tile(b_, h, p, pair_kv, pair_q, pair_count):
        return b_, h, pair_kv[(b_ * hkv + h) * pc + p]

    row = _row_spec(r, dp, q_tile)
    kv_block = pl.BlockSpec((None, None, None, kk, dp), lambda *a: (*kv_tile(*a), 0, 0))
    in_specs = (
        [row, _side_spec(rows, q_tile), row]
        + _kv_side_specs(kk, dp, kv_tile)
        + [kv_block, kv_block]
    )
    acc_shape = _out(k.shape, jnp.float32, k)
    kernel = functools.partial(_dkdv_kernel, scale=scale, spec=spec, hkv=hkv, num_p=pc)
    row_bytes = (2 * r * dp * q.dtype.itemsize + rows.shape[3] * r * 4) * b * hkv * pc
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, hkv, pc),
            in_specs=in_specs,
            out_specs=[kv_block, kv_block],
            scratch_shapes=[pltpu.VMEM((kk, dp), jnp.float32), pltpu.VMEM((kk, dp), jnp.float32)],
        ),
        out_shape=[acc_shape, acc_shape],
        input_output_aliases=aliases(DKV_OPERANDS, ("dk", "dv")),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        cost_estimate=_cost(b, hkv, pc, r, kk, dp, 4, row_bytes + 4 * k.nbytes + 8 * k.size),
        interpret=interpret,
    )

    def chunked(x: Array) -> Array:  # [B*Hkv*P] -> [B*Hkv, nch * pc], the tail repeated
        x = x.reshape(b * hkv, pairs.num_p)
        return jnp.pad(x, [(0, 0), (0, nch * pc - pairs.num_p)], mode="edge")

    pair_kv, pair_q = chunked(pairs.pair_kv), chunked(pairs.pair_q)

    def body(c: Array, acc):
        def sl(x: Array) -> Array:
            return jax.lax.dynamic_slice_in_dim(x, c * pc, pc, 1).reshape(-1)

        count = jnp.clip(pairs.pair_count - c * pc, 0, pc)
        dk, dv = acc
        return tuple(call(*ordered(DKV_OPERANDS, pair_kv=sl(pair_kv), pair_q=sl(pair_q),
                                   count=count, q=q, rows=rows, do=do, k=k, v=v, k_seg=k_seg,
                                   k_pos=k_pos, dk=dk, dv=dv)))

    zeros = jnp.zeros_like(k, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, nch, body, (zeros, zeros))
    return (dk * scale).astype(k.dtype), dv.astype(v.dtype)


# --------------------------------------------------------------------------- row statistics


def _importance_kernel(
    base, kv_list, kv_count, proj_start, q_ref, rows_ref, red_ref, k_ref, kseg_ref, kpos_ref,
    proj_ref, _out, out_ref, *, scale, spec, hkv, ct, num_u,
):
    b, h, i, u = (pl.program_id(a) for a in range(4))
    flat = (b * hkv + h) * ct + i

    @pl.when(u == 0)
    def _init():  # the output block stays resident across u: it is the accumulator
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(u < kv_count[flat])
    def _step():
        tile = kv_list[flat * num_u + u]
        qseg, qpos, (lse,), _ = _unpack(rows_ref[...], 1, False)
        mask = _mask(qseg, qpos, kseg_ref[...], kpos_ref[...], None, tile, spec)
        s = _dot_t(q_ref[...], k_ref[...]) * scale
        # min(., 0): a probability never exceeds 1 even where lse was computed in another pass
        p = jnp.where(mask, jnp.exp(jnp.minimum(s - lse, 0.0)), 0.0)  # [R, K]
        scores = _dot(_dot(red_ref[...], p), proj_ref[...])  # [A, R][R, K][K, Wb]
        # the output keeps its 128-lane tiles on a leading axis: the tile's band offset is a
        # dynamic index on an untiled dim, and each lane tile a static slice
        start = proj_start[tile]
        for c in range(proj_ref.shape[-1] // LANES):
            out_ref[start + c] += scores[:, c * LANES : (c + 1) * LANES]


def sparse_importance(
    q: Array,
    q_seg: Array,
    q_pos: Array,
    lse: Array,
    reduce_rows: Array,
    k: Array,
    k_seg: Array,
    k_pos: Array,
    proj: Array,
    proj_start: Array,
    width: int,
    lists: FwdLists,
    *,
    scale: float,
    spec: MaskSpec,
    interpret: object,
    budget: int = LIST_BUDGET,
) -> Array:
    """Probabilities of a finished attention pass, reduced over rows and projected over keys:
    `out[b, h, i][:, start_j : start_j + Wb] += reduce_rows @ P_j @ proj[j]` over the visited
    key tiles `j`, with `P = mask * exp(q k^T * scale - lse)` (`[R, K]`, `lse` from the forward)
    and `start_j = 128 * proj_start[j]` (`proj_start` counts 128-lane tiles); `out` is
    `[B, Hkv, Nq, A, width]` f32 (the kernel writes it as `[B, Hkv, Nq, width / 128, A, 128]`).

    NSA's block importance is this with `reduce_rows [A, R]` summing the GQA group of each
    token (A = block_q) and `proj [Nk, K, Wb]` the band of NSA Eq. 9's compressed-to-selection
    map that key tile `j` touches, so the scores leave the kernel per (token, KV head, selection
    block), and the projection costs `O(K * Wb)` per tile however long the sequence. One extra
    QK^T pass over the forward's lists; no `[T, Nc]` probabilities per head reach HBM.
    """
    b, hkv, nq, r, dp = q.shape
    kk = k.shape[3]
    a, wb = reduce_rows.shape[0], proj.shape[-1]
    rows = pack_rows(q_seg, q_pos, None, hkv, lse)
    num_u = lists.num_u
    ct = query_chunk(b, hkv, nq, num_u, budget - proj_start.shape[0])
    kv_tile = _chunk_kv_tile(hkv, ct, num_u)
    k_specs = _kv_side_specs(kk, dp, kv_tile)
    in_specs = (
        [_row_spec(r, dp, _chunk_q_tile), _side_spec(rows, _chunk_q_tile)]
        + [pl.BlockSpec((a, r), lambda *_: (0, 0))]
        + [k_specs[0], k_specs[2], k_specs[3]]
        + [pl.BlockSpec((None, kk, wb), lambda *x: (kv_tile(*x)[2], 0, 0))]
        + _any_specs(1)
    )
    kernel = functools.partial(
        _importance_kernel, scale=scale, spec=spec, hkv=hkv, ct=ct, num_u=num_u
    )
    out_shape = _out((b, hkv, nq, width // LANES, a, LANES), jnp.float32, q)
    steps = ct * num_u
    nbytes = q.nbytes + rows.nbytes + b * hkv * steps * kk * (dp * k.dtype.itemsize + wb * 4)
    call = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, hkv, ct, num_u),
            in_specs=in_specs,
            out_specs=pl.BlockSpec(
                (None, None, None, width // LANES, a, LANES),
                lambda *x: (*_chunk_q_tile(*x), 0, 0, 0),
            ),
        ),
        out_shape=out_shape,
        input_output_aliases=aliases(IMPORTANCE_OPERANDS, ("out",)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * hkv * steps * r * kk * (dp + a + wb),
            transcendentals=b * hkv * steps * r * kk,
            bytes_accessed=nbytes + out_shape.size * 4,
        ),
        interpret=interpret,
    )

    def chunk(base, kv_list, kv_count, out):
        return (call(*ordered(IMPORTANCE_OPERANDS, base=base, kv_list=kv_list,
                              kv_count=kv_count, proj_start=proj_start, q=q, rows=rows,
                              reduce_rows=reduce_rows, k=k, k_seg=k_seg, k_pos=k_pos, proj=proj,
                              out=out)),)

    init = (jnp.zeros_like(q, jnp.float32, out_shape.shape),)
    (out,) = _over_query_chunks(chunk, lists, b, hkv, nq, ct, init)
    return out.transpose(0, 1, 2, 4, 3, 5).reshape(b, hkv, nq, a, width)


# --------------------------------------------------------------------------- custom_vjp


@dataclasses.dataclass(frozen=True)
class Meta:
    """Integer side inputs of one attention call (segments, positions, selection, lists)."""

    q_seg: Array
    q_pos: Array
    idx_rows: Array | None
    k_seg: Array
    k_pos: Array
    kv_list: Array
    kv_count: Array
    pairs: PairLists | None = None  # `FwdLists.pairs`


jax.tree_util.register_dataclass(
    PairLists, data_fields=["pair_kv", "pair_q", "pair_count"], meta_fields=["num_p"]
)
jax.tree_util.register_dataclass(
    Meta,
    data_fields=["q_seg", "q_pos", "idx_rows", "k_seg", "k_pos", "kv_list", "kv_count", "pairs"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class Static:
    scale: float
    spec: MaskSpec
    num_u: int
    interpret: object
    budget: int = LIST_BUDGET


def _lists(meta: Meta, st: Static) -> FwdLists:
    return FwdLists(meta.kv_list, meta.kv_count, st.num_u, meta.pairs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: Array, k: Array, v: Array, meta: Meta, st: Static) -> tuple[Array, Array]:
    """Block-sparse attention in the kernel layout: `(o, lse)`, differentiable in q, k, v
    (and through `lse`, whose cotangent enters the backward as `delta -= dlse`)."""
    return _attend_fwd(q, k, v, meta, st)[0]


def _attend_fwd(q, k, v, meta: Meta, st: Static):
    o, lse = sparse_fwd(
        q, meta.q_seg, meta.q_pos, meta.idx_rows, k, v, meta.k_seg, meta.k_pos,
        _lists(meta, st), scale=st.scale, spec=st.spec, interpret=st.interpret,
        budget=st.budget,
    )
    return (o, lse), (q, k, v, meta, o, lse)


def _attend_bwd(st: Static, res, cts):
    q, k, v, meta, o, lse = res
    do, dlse = cts
    delta = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1) - dlse.reshape(o.shape[:-1])
    b, hkv, nq = q.shape[:3]
    args = (q, meta.q_seg, meta.q_pos, meta.idx_rows, do, lse, delta, k, v, meta.k_seg, meta.k_pos)
    kw = dict(scale=st.scale, spec=st.spec, interpret=st.interpret, budget=st.budget)
    lists = _lists(meta, st)
    dq = sparse_dq(*args, lists, **kw)
    dk, dv = sparse_dkdv(*args, pair_lists(lists, b, hkv, nq, k.shape[2]), **kw)
    return dq, dk, dv, None  # integer side inputs: no cotangent


attend.defvjp(_attend_fwd, _attend_bwd)
