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
  lse, delta:   [B, Hkv, Nq, R, 1] f32
  k, v:         [B, Hkv, Nk, K, Dp]   K keys per tile (padded to the sublane tile)
  k_seg, k_pos: [B, Nk, 1, K], [Nk, 1, K] int32
  idx_rows:     [B, Hkv, Nq, R, n] int32, the selection of each row's token (selected only)

Putting the tile index on a leading axis makes every block's two trailing dims full array
dims, so any tile size is a legal Mosaic block; the wrapper pads tiles to the sublane size.
Inside each kernel call the per-row side inputs (segment, position, lse, delta, selection)
travel packed along lanes in one `[B, Hkv, Nq, R, C]` array (`pack_rows`): one `[R, 1]` array
alone would occupy a full 128-lane row of HBM tiles.

Mask of row r against key c: `seg_q == seg_k > 0` and `pos_k <= pos_q`, and when
`window > 0` also `pos_k > pos_q - window`, and when `use_member` the row's token selected
the key's tile. Positions are whatever the caller makes them (the compressed branch passes
the last token of each block, and negates both sides for VideoNSA's reversed causality).

Index lists (scalar prefetch, flat int32):
  forward and dq, grid (B, Hkv, Nq, U):  kv_list [B*Hkv*Nq*U] ascending tiles, the tail
    after kv_count[B*Hkv*Nq] valid entries repeats the last valid tile, so the pipeline sees
    an unchanged block index and skips the fetch while `pl.when` skips the compute;
  dk/dv, grid (B, Hkv, P):  the (kv tile, query tile) pairs of the forward lists sorted by kv
    tile (pair_kv, pair_q, pair_count), tail filled the same way. Consecutive steps on the same
    kv tile accumulate into VMEM scratch and write the tile once on its last pair, so dk/dv
    need no atomics and no [Nk, Nq] dense sweep: the work is exactly the forward's pairs
    (megablox's grouped-matmul pattern). Tiles no query visits keep the zeros of the aliased
    input buffer.
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
from pallas_kernels.numerics import NEG_INF

Array = jax.Array
LANES = 128


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static mask options. `window > 0`: band of `window` keys; `use_member`: selected."""

    window: int = 0
    use_member: bool = False


@dataclasses.dataclass(frozen=True)
class FwdLists:
    """Per query tile, its kv tiles: `kv_list [B*Hkv*Nq*U]`, `kv_count [B*Hkv*Nq]`."""

    kv_list: Array
    kv_count: Array
    num_u: int


@dataclasses.dataclass(frozen=True)
class PairLists:
    """(kv tile, query tile) pairs sorted by kv tile: `[B*Hkv*P]` each, count `[B*Hkv]`."""

    pair_kv: Array
    pair_q: Array
    pair_count: Array
    num_p: int


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
    `num_u` is the widest range."""
    count = np.maximum(hi - lo + 1, 0).astype(np.int32)
    num_u = max(int(count.max()), 1)
    vals = lo[:, None] + np.arange(num_u)[None]
    last = np.where(count > 0, lo + count - 1, 0)
    filled = np.where(np.arange(num_u)[None] < count[:, None], vals, last[:, None])
    nq = lo.shape[0]
    kv_list = np.broadcast_to(filled.astype(np.int32), (b, hkv, nq, num_u))
    kv_count = np.broadcast_to(count, (b, hkv, nq))
    return FwdLists(jnp.asarray(kv_list.reshape(-1)), jnp.asarray(kv_count.reshape(-1)), num_u)


def pair_lists(fwd: FwdLists, b: int, hkv: int, nq: int) -> PairLists:
    """Inverts the forward lists: every valid (query tile, kv tile) pair, sorted by kv tile."""
    u = fwd.num_u
    kv = fwd.kv_list.reshape(b, hkv, nq * u)
    qi = jnp.broadcast_to(jnp.repeat(jnp.arange(nq, dtype=jnp.int32), u), kv.shape)
    valid = (jnp.arange(u) < fwd.kv_count.reshape(b, hkv, nq, 1)).reshape(b, hkv, nq * u)
    big = jnp.iinfo(jnp.int32).max
    key = jnp.where(valid, kv * nq + qi, big)  # kv major, query tile minor
    order = jnp.argsort(key, axis=-1)
    count = valid.sum(-1).astype(jnp.int32)
    pkv = _fill_tail(jnp.take_along_axis(kv, order, -1), count)
    pq = _fill_tail(jnp.take_along_axis(qi, order, -1), count)
    return PairLists(pkv.reshape(-1), pq.reshape(-1), count.reshape(-1), nq * u)


# --------------------------------------------------------------------------- kernel pieces


def _dot_t(a: Array, b: Array) -> Array:
    """`a @ b.T` with f32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: Array, b: Array) -> Array:
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a: Array, b: Array) -> Array:
    """`a.T @ b` with f32 accumulation."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


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
    """Per-row side data of the query tiles, packed along lanes: `[B, Hkv, Nq, R, C]` f32.

    Column 0 holds the row's segment and 1 its position (int32 bit patterns), then `stats`
    (f32 `[B, Hkv, Nq, R, 1]` each: lse, delta), then the row's selection (int32 bits,
    selected attention only). On TPU an `[R, 1]` array fills a whole 128-lane tile row in HBM
    and VMEM (512 bytes a row, twice a bf16 query row at D = 128); packed, every side input
    of a row shares one, which matters most where dk/dv stream the query side once per pair.
    """
    b, nq, r, _ = q_seg.shape

    def bits(x: Array) -> Array:
        return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.float32)

    cols = [
        jnp.broadcast_to(bits(q_seg)[:, None], (b, hkv, nq, r, 1)),
        jnp.broadcast_to(bits(q_pos)[None, None], (b, hkv, nq, r, 1)),
        *(x.astype(jnp.float32) for x in stats),
    ]
    if idx_rows is not None:
        cols.append(bits(idx_rows))
    return jnp.concatenate(cols, -1)


def _unpack(rows: Array, n_stats: int, use_member: bool):
    """`(seg, pos, stats, idx)` of a packed `[R, C]` block (see `pack_rows`)."""

    def ints(x: Array) -> Array:
        return jax.lax.bitcast_convert_type(x, jnp.int32)

    stats = [rows[:, 2 + i : 3 + i] for i in range(n_stats)]
    idx = ints(rows[:, 2 + n_stats :]) if use_member else None
    return ints(rows[:, 0:1]), ints(rows[:, 1:2]), stats, idx


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


# --------------------------------------------------------------------------- forward


def _fwd_kernel(
    kv_list, kv_count, q_ref, rows_ref, k_ref, v_ref, kseg_ref, kpos_ref, o_ref, lse_ref,
    m_sc, l_sc, acc_sc, *, scale, spec, hkv, nq, num_u,
):
    b, h, i, u = (pl.program_id(a) for a in range(4))
    flat = (b * hkv + h) * nq + i

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
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe), NEG_INF)


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
) -> tuple[Array, Array]:
    """Forward: `o [B, Hkv, Nq, R, Dp]` (q.dtype) and `lse [B, Hkv, Nq, R, 1]` f32."""
    b, hkv, nq, r, dp = q.shape
    kk = k.shape[3]
    rows = pack_rows(q_seg, q_pos, _use_idx(idx_rows, spec), hkv)
    num_u = lists.num_u

    def q_tile(b_, h, i, u, *_):
        return b_, h, i

    def kv_tile(b_, h, i, u, kv_list, kv_count):
        return b_, h, kv_list[((b_ * hkv + h) * nq + i) * num_u + u]

    kernel = functools.partial(
        _fwd_kernel, scale=scale, spec=spec, hkv=hkv, nq=nq, num_u=num_u
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, nq, num_u),
            in_specs=[_row_spec(r, dp, q_tile), _row_spec(r, rows.shape[-1], q_tile)]
            + _kv_side_specs(kk, dp, kv_tile),
            out_specs=[_row_spec(r, dp, q_tile), _row_spec(r, 1, q_tile)],
            scratch_shapes=[
                pltpu.VMEM((r, 1), jnp.float32),
                pltpu.VMEM((r, 1), jnp.float32),
                pltpu.VMEM((r, dp), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, hkv, nq, r, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(lists.kv_list, lists.kv_count, q, rows, k, v, k_seg, k_pos)


# --------------------------------------------------------------------------- backward: dq


def _probs_and_ds(q, do, lse, delta, k, v, mask, scale):
    """Recomputed probabilities `p` and `ds = p * (dp - delta)`, both `[R, K]` f32."""
    s = _dot_t(q, k) * scale
    p = jnp.where(mask, jnp.exp(jnp.where(mask, s - lse, 0.0)), 0.0)
    dp = _dot_t(do, v)
    return p, p * (dp - delta)


def _dq_kernel(
    kv_list, kv_count, q_ref, rows_ref, do_ref, k_ref, v_ref, kseg_ref, kpos_ref, dq_ref, acc,
    *, scale, spec, hkv, nq, num_u,
):
    b, h, i, u = (pl.program_id(a) for a in range(4))
    flat = (b * hkv + h) * nq + i

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
    scale: float, spec: MaskSpec, interpret: object,
) -> Array:
    """dq `[B, Hkv, Nq, R, Dp]`; `delta = rowsum(do * o) - dlse` `[B, Hkv, Nq, R, 1]` f32."""
    b, hkv, nq, r, dp = q.shape
    kk = k.shape[3]
    rows = pack_rows(q_seg, q_pos, _use_idx(idx_rows, spec), hkv, lse, delta)
    num_u = lists.num_u

    def q_tile(b_, h, i, u, *_):
        return b_, h, i

    def kv_tile(b_, h, i, u, kv_list, kv_count):
        return b_, h, kv_list[((b_ * hkv + h) * nq + i) * num_u + u]

    row = _row_spec(r, dp, q_tile)
    kernel = functools.partial(_dq_kernel, scale=scale, spec=spec, hkv=hkv, nq=nq, num_u=num_u)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, hkv, nq, num_u),
            in_specs=[row, _row_spec(r, rows.shape[-1], q_tile), row]
            + _kv_side_specs(kk, dp, kv_tile),
            out_specs=row,
            scratch_shapes=[pltpu.VMEM((r, dp), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(lists.kv_list, lists.kv_count, q, rows, do, k, v, k_seg, k_pos)


# --------------------------------------------------------------------------- backward: dk, dv


def _dkdv_kernel(
    pair_kv, pair_q, pair_count, q_ref, rows_ref, do_ref, k_ref, v_ref, kseg_ref, kpos_ref,
    _zk, _zv, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, spec, hkv, num_p,
):
    b, h, p = (pl.program_id(a) for a in range(3))
    flat = b * hkv + h
    base = flat * num_p
    count = pair_count[flat]
    tile = pair_kv[base + p]
    valid = p < count
    first = (p == 0) | (tile != pair_kv[base + jnp.maximum(p - 1, 0)])
    last = (p + 1 == count) | (tile != pair_kv[base + jnp.minimum(p + 1, num_p - 1)])

    @pl.when(valid & first)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(valid)
    def _step():
        qseg, qpos, (lse, delta), idx = _unpack(rows_ref[...], 2, spec.use_member)
        mask = _mask(qseg, qpos, kseg_ref[...], kpos_ref[...], idx, tile, spec)
        q, do = q_ref[...], do_ref[...]
        pr, ds = _probs_and_ds(q, do, lse, delta, k_ref[...], v_ref[...], mask, scale)
        dv_acc[...] += _t_dot(pr.astype(do.dtype), do)
        dk_acc[...] += _t_dot(ds.astype(q.dtype), q)

    @pl.when(valid & last)
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    @pl.when((count == 0) & (p == 0))
    def _nothing_visited():  # the pipeline writes this step's block back: make it zeros
        dk_ref[...] = jnp.zeros_like(dk_ref)
        dv_ref[...] = jnp.zeros_like(dv_ref)


def sparse_dkdv(
    q, q_seg, q_pos, idx_rows, do, lse, delta, k, v, k_seg, k_pos, pairs: PairLists, *,
    scale: float, spec: MaskSpec, interpret: object,
) -> tuple[Array, Array]:
    """dk, dv `[B, Hkv, Nk, K, Dp]` in k.dtype, one pass over the sorted pairs."""
    b, hkv, nq, r, dp = q.shape
    kk = k.shape[3]
    rows = pack_rows(q_seg, q_pos, _use_idx(idx_rows, spec), hkv, lse, delta)
    num_p = pairs.num_p

    def q_tile(b_, h, p, pair_kv, pair_q, pair_count):
        return b_, h, pair_q[(b_ * hkv + h) * num_p + p]

    def kv_tile(b_, h, p, pair_kv, pair_q, pair_count):
        return b_, h, pair_kv[(b_ * hkv + h) * num_p + p]

    row = _row_spec(r, dp, q_tile)
    kv_out = pl.BlockSpec((None, None, None, kk, dp), lambda *a: (*kv_tile(*a), 0, 0))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    in_specs = (
        [row, _row_spec(r, rows.shape[-1], q_tile), row]
        + _kv_side_specs(kk, dp, kv_tile)
        + [any_spec, any_spec]
    )
    operands = [q, rows, do, k, v, k_seg, k_pos, jnp.zeros_like(k), jnp.zeros_like(v)]
    n_in = 3 + len(operands)  # scalar-prefetch operands count in the alias numbering
    kernel = functools.partial(_dkdv_kernel, scale=scale, spec=spec, hkv=hkv, num_p=num_p)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, hkv, num_p),
            in_specs=in_specs,
            out_specs=[kv_out, kv_out],
            scratch_shapes=[pltpu.VMEM((kk, dp), jnp.float32), pltpu.VMEM((kk, dp), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        # unvisited kv tiles keep these zeros: their gradient is zero
        input_output_aliases={n_in - 2: 0, n_in - 1: 1},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(pairs.pair_kv, pairs.pair_q, pairs.pair_count, *operands)


# --------------------------------------------------------------------------- row statistics


def _importance_kernel(
    kv_list, kv_count, proj_start, q_ref, rows_ref, red_ref, k_ref, kseg_ref, kpos_ref,
    proj_ref, out_ref, *, scale, spec, hkv, nq, num_u,
):
    b, h, i, u = (pl.program_id(a) for a in range(4))
    flat = (b * hkv + h) * nq + i

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
        base = proj_start[tile]
        for c in range(proj_ref.shape[-1] // LANES):
            out_ref[base + c] += scores[:, c * LANES : (c + 1) * LANES]


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

    def q_tile(b_, h, i, u, *_):
        return b_, h, i

    def kv_tile(b_, h, i, u, kv_list, kv_count, proj_start):
        return b_, h, kv_list[((b_ * hkv + h) * nq + i) * num_u + u]

    k_specs = _kv_side_specs(kk, dp, kv_tile)
    in_specs = (
        [_row_spec(r, dp, q_tile), _row_spec(r, rows.shape[-1], q_tile)]
        + [pl.BlockSpec((a, r), lambda *_: (0, 0))]
        + [k_specs[0], k_specs[2], k_specs[3]]
        + [pl.BlockSpec((None, kk, wb), lambda *x: (kv_tile(*x)[2], 0, 0))]
    )
    kernel = functools.partial(
        _importance_kernel, scale=scale, spec=spec, hkv=hkv, nq=nq, num_u=num_u
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, hkv, nq, num_u),
            in_specs=in_specs,
            out_specs=pl.BlockSpec(
                (None, None, None, width // LANES, a, LANES), lambda *x: (*q_tile(*x), 0, 0, 0)
            ),
        ),
        out_shape=jax.ShapeDtypeStruct((b, hkv, nq, width // LANES, a, LANES), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )(
        lists.kv_list, lists.kv_count, proj_start,
        q, rows, reduce_rows, k, k_seg, k_pos, proj,
    )  # fmt: skip
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


jax.tree_util.register_dataclass(
    Meta,
    data_fields=["q_seg", "q_pos", "idx_rows", "k_seg", "k_pos", "kv_list", "kv_count"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class Static:
    scale: float
    spec: MaskSpec
    num_u: int
    interpret: object


def _lists(meta: Meta, st: Static) -> FwdLists:
    return FwdLists(meta.kv_list, meta.kv_count, st.num_u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q: Array, k: Array, v: Array, meta: Meta, st: Static) -> tuple[Array, Array]:
    """Block-sparse attention in the kernel layout: `(o, lse)`, differentiable in q, k, v
    (and through `lse`, whose cotangent enters the backward as `delta -= dlse`)."""
    return _attend_fwd(q, k, v, meta, st)[0]


def _attend_fwd(q, k, v, meta: Meta, st: Static):
    o, lse = sparse_fwd(
        q, meta.q_seg, meta.q_pos, meta.idx_rows, k, v, meta.k_seg, meta.k_pos,
        _lists(meta, st), scale=st.scale, spec=st.spec, interpret=st.interpret,
    )
    return (o, lse), (q, k, v, meta, o, lse)


def _attend_bwd(st: Static, res, cts):
    q, k, v, meta, o, lse = res
    do, dlse = cts
    delta = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1, keepdims=True) - dlse
    b, hkv, nq = q.shape[:3]
    args = (q, meta.q_seg, meta.q_pos, meta.idx_rows, do, lse, delta, k, v, meta.k_seg, meta.k_pos)
    kw = dict(scale=st.scale, spec=st.spec, interpret=st.interpret)
    lists = _lists(meta, st)
    dq = sparse_dq(*args, lists, **kw)
    dk, dv = sparse_dkdv(*args, pair_lists(lists, b, hkv, nq), **kw)
    return dq, dk, dv, None  # integer side inputs: no cotangent


attend.defvjp(_attend_fwd, _attend_bwd)
