"""`nsa_attention` on NVIDIA GPUs: the three NSA branches as Pallas (Triton) kernels.

Pipeline (same maths as `pallas_kernels.reference.nsa_reference`):
1. `compress_kv` (the reference's jnp code: mean pooling or the MLP, differentiable by XLA);
2. compressed attention, `banded.banded_attention` with `stride = d`, `offset = l - 1`:
   `o_cmp` and `lse`;
3. block selection under `stop_gradient`: the group-summed compressed probabilities re-derived
   from `lse`, mapped to selection blocks (NSA Eq. 9) and the top-n kept in registers by one
   kernel (`select.select_top_blocks`), for any `l`, `d`, `l'`: no `[T, Nc]` array;
4. sliding window, `banded.banded_attention` with `stride = 1`, `offset = 0`, `window = w`;
5. selected attention and the gate mix in f32, `selected.selected_mixed` (group-centric
   forward and dQ, block-centric dK/dV; the forward mixes `o_cmp`, `o_slc`, `o_swa` in its
   epilogue, so the selected branch reaches HBM only as a training residual). Token tiles
   (`slc_tokens > 1`) use `selected.selected_attention` and an XLA mix.
Each kernel has a `custom_vjp`; gradients reach q, k, v, gates and the compression params.
`videonsa_compat` (compressed blocks visible to earlier queries, a non-causal pattern) runs
through the reference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.gpu.banded import BandParams, banded_attention
from pallas_kernels.gpu.select import select_top_blocks
from pallas_kernels.gpu.selected import SelParams, selected_attention, selected_mixed
from pallas_kernels.numerics import round_up
from pallas_kernels.reference import NSAConfig, checks, combine_branches, compress_kv, nsa_reference
from pallas_kernels.reference.segments import cmp_block_segments
from pallas_kernels.tiles import BlockSizes

Array = jax.Array


def pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static layout of one GPU NSA call: padded lengths and each kernel's parameters."""

    t: int  # real length
    tp: int  # padded length (a multiple of every query tile and of the selection block)
    ncp: int  # padded number of compressed blocks
    g: int  # GQA group size
    cmp: BandParams
    imp: BandParams
    slc: SelParams
    win: BandParams | None  # None when the window is off


def make_plan(
    b: int,
    t: int,
    hq: int,
    hkv: int,
    d: int,
    cfg: NSAConfig,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> Plan:
    """The `Plan` for `q: [b, t, hq, d]`, `k, v: [b, t, hkv, d]` under `cfg`."""
    bsz = block_sizes or BlockSizes()
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    g = hq // hkv
    scale = d**-0.5
    launch = dict(num_warps=bsz.num_warps, num_stages=bsz.num_stages, interpret=interpret)
    tiles = (
        bsz.cmp_q,
        bsz.cmp_q_bwd,
        bsz.win_q,
        bsz.win_k,
        bsz.win_q_bwd,
        bsz.win_k_bwd,
        bsz.score_q,
        bsz.slc_tokens,
        cfg.block_size,
    )
    tp = round_up(t, math.lcm(*tiles))
    score_k = bsz.score_k or (128 if g >= 16 else 64)
    ncp = round_up(cfg.num_cmp_blocks(tp), math.lcm(bsz.cmp_k, bsz.cmp_k_bwd))
    # ~32 waves of dK/dV programs over the H100's 132 SMs: key tiles near the start see
    # every later query, so short programs balance the load (measured best of 4 to 32 at 128K)
    splits = bsz.cmp_splits or max(
        1, min(tp // bsz.cmp_q_bwd, -(-32 * 132 // (b * hkv * (ncp // bsz.cmp_k_bwd))))
    )
    cmp = BandParams(
        stride=cfg.cmp_stride,
        offset=cfg.cmp_block - 1,
        window=0,
        scale=scale,
        block_q=bsz.cmp_q,
        block_k=bsz.cmp_k,
        block_q_bwd=bsz.cmp_q_bwd,
        block_k_bwd=bsz.cmp_k_bwd,
        splits=splits,
        **launch,
    )
    slc = SelParams(
        block=cfg.block_size,
        scale=scale,
        rows=max(bsz.slc_rows, 1 << (g - 1).bit_length()),
        item_chunks=bsz.slc_item_chunks,
        tokens=bsz.slc_tokens,
        dq_in_dkv=bool(bsz.slc_dq_in_dkv),
        group_warps=bsz.slc_group_warps,
        **launch,
    )
    win = None
    if cfg.window:
        win = BandParams(
            stride=1,
            offset=0,
            window=cfg.window,
            scale=scale,
            block_q=bsz.win_q,
            block_k=bsz.win_k,
            block_q_bwd=bsz.win_q_bwd,
            block_k_bwd=bsz.win_k_bwd,
            **launch,
        )
    imp = dataclasses.replace(cmp, block_q=bsz.score_q, block_k=score_k)
    return Plan(t=t, tp=tp, ncp=ncp, g=g, cmp=cmp, imp=imp, slc=slc, win=win)


def pad_inputs(
    plan: Plan, q: Array, k: Array, v: Array, segment_ids: Array | None
) -> tuple[Array, Array, Array, Array, Array]:
    """`(seg, segp, qp, kp, vp)`: int32 segments `[B, T]`, and everything padded to `plan.tp`."""
    b, t = q.shape[:2]
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return (seg, pad_axis(seg, 1, plan.tp), *(pad_axis(x, 1, plan.tp) for x in (q, k, v)))


def compressed_branch(
    plan: Plan,
    cfg: NSAConfig,
    qp: Array,
    k: Array,
    v: Array,
    seg: Array,
    segp: Array,
    compress_params: dict[str, Array] | None,
) -> tuple[Array, Array, Array, Array]:
    """`(o_cmp [B, Tp, Hq, D], lse [B, Hq, Tp], k_cmp [B, Ncp, Hkv, D], blk_seg [B, Ncp])`."""
    k_cmp, v_cmp = compress_kv(k, v, cfg, compress_params)
    kcp, vcp = (pad_axis(x.astype(qp.dtype), 1, plan.ncp) for x in (k_cmp, v_cmp))
    bseg = pad_axis(cmp_block_segments(seg, cfg), 1, plan.ncp, value=-1)
    o_cmp, lse = banded_attention(qp, kcp, vcp, segp, bseg, plan.cmp)
    return o_cmp, lse, kcp, bseg


def selection(
    plan: Plan, cfg: NSAConfig, qp: Array, kcp: Array, lse: Array, segp: Array, bseg: Array
) -> Array:
    """Top-n blocks `idx: [B, Tp, Hkv, n]` (no gradient flows through the choice)."""
    qs, kcs, lses = jax.lax.stop_gradient((qp, kcp, lse))
    return select_top_blocks(qs, kcs, lses, segp, bseg, plan.imp, cfg)


def window_branch(plan: Plan, qp: Array, kp: Array, vp: Array, segp: Array) -> Array | None:
    """Sliding-window output `[B, Tp, Hq, D]` (None when the window is off)."""
    if plan.win is None:
        return None
    return banded_attention(qp, kp, vp, segp, segp, plan.win)[0]


def nsa_attention(
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    compress_params: dict[str, Array] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> Array:
    """NSA `o: [B, T, Hq, D]` with Pallas GPU kernels; signature of `nsa_reference`.

    Args:
      q: `[B, T, Hq, D]`; `k`, `v`: `[B, T, Hkv, D]` (any group size `G = Hq / Hkv`).
      gates: `[B, T, Hq, 3]` in (0, 1): compressed, selected, window.
      cfg: `NSAConfig`.
      segment_ids: optional `[B, T]` ints, 0 = padding.
      compress_params: the compression MLP's params when `cfg.compression == "mlp"`.
      block_sizes: kernel tiles (`BlockSizes()` by default).
      interpret: run the kernels in Pallas interpret mode (default: when not on a GPU).
    """
    b, t, hq, hkv, d = checks.check_nsa_inputs(q, k, v, gates, segment_ids)
    if cfg.videonsa_compat:
        return nsa_reference(
            q, k, v, gates, cfg, segment_ids=segment_ids, compress_params=compress_params
        )
    plan = make_plan(b, t, hq, hkv, d, cfg, block_sizes, interpret)
    seg, segp, qp, kp, vp = pad_inputs(plan, q, k, v, segment_ids)
    o_cmp, lse, kcp, bseg = compressed_branch(plan, cfg, qp, k, v, seg, segp, compress_params)
    idx = selection(plan, cfg, qp, kcp, lse, segp, bseg)
    o_swa = window_branch(plan, qp, kp, vp, segp)
    gp = pad_axis(gates, 1, plan.tp)
    if plan.slc.tokens == 1:  # the gate mix in the selected kernel's epilogue
        return selected_mixed(qp, kp, vp, segp, idx, gp, o_cmp, o_swa, plan.slc)[:, :t]
    o_slc = selected_attention(qp, kp, vp, segp, idx, plan.slc)
    o_swa = jnp.zeros_like(qp) if o_swa is None else o_swa
    return combine_branches(gp, o_cmp, o_slc, o_swa)[:, :t]


def nsa_indices(
    q: Array,
    k: Array,
    v: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    compress_params: dict[str, Array] | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> Array:
    """The selection `idx: [B, T, Hkv, n]` the GPU path uses (for tests and analysis)."""
    if cfg.videonsa_compat:
        raise ValueError(
            "nsa_indices: videonsa_compat runs through the reference on GPU; "
            "use nsa_jax.attention.select_blocks for its selection"
        )
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    plan = make_plan(b, t, hq, hkv, d, cfg, block_sizes, interpret)
    seg, segp, qp, _, _ = pad_inputs(plan, q, k, v, segment_ids)
    _, lse, kcp, bseg = compressed_branch(plan, cfg, qp, k, v, seg, segp, compress_params)
    return selection(plan, cfg, qp, kcp, lse, segp, bseg)[:, :t]
