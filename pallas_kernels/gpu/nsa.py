"""`nsa_attention` on NVIDIA GPUs: the three NSA branches as Pallas (Triton) kernels.

Pipeline (same maths as `nsa_jax.attention.reference.nsa_reference`):
1. `compress_kv` (the reference's jnp code: mean pooling or the MLP, differentiable by XLA);
2. compressed attention, `banded.banded_attention` with `stride = d`, `offset = l - 1`:
   `o_cmp` and `lse`;
3. block importance (`select.block_importance`, a Pallas kernel re-deriving the group-summed
   probabilities from `lse`) and `select.top_blocks` (forced blocks + `lax.top_k`), under
   `stop_gradient`;
4. selected attention, `selected.selected_attention` (group-centric forward and dQ,
   block-centric dK/dV);
5. sliding window, `banded.banded_attention` with `stride = 1`, `offset = 0`, `window = w`;
6. the gate mix in f32 (one XLA fusion).
Each kernel has a `custom_vjp`; gradients reach q, k, v, gates and the compression params.
`videonsa_compat` (compressed blocks visible to earlier queries, a non-causal pattern) runs
through the reference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from nsa_jax.attention import checks
from nsa_jax.attention.reference import (
    NSAConfig,
    _cmp_block_segments,
    combine_branches,
    compress_kv,
    nsa_reference,
)
from pallas_kernels.gpu.banded import BandParams, banded_attention
from pallas_kernels.gpu.select import block_importance, top_blocks
from pallas_kernels.gpu.selected import SelParams, selected_attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the GPU kernels (tokens unless said otherwise).

    Attributes:
      cmp_q, cmp_k: query / compressed-key tiles of the compressed forward and dQ.
      cmp_q_bwd, cmp_k_bwd: tiles of the compressed dK/dV kernel.
      cmp_splits: query-range splits of the compressed dK/dV kernel (0 = pick for ~4 waves).
      win_q, win_k, win_q_bwd, win_k_bwd: tiles of the sliding-window kernels.
      score_q: query tile of the block-importance kernel.
      slc_rows: gathered query rows per step of the selected dK/dV kernel (>= G).
      slc_item_chunks: steps per selected dK/dV program.
      num_warps, num_stages: Triton launch parameters shared by every kernel.
    """

    cmp_q: int = 64
    cmp_k: int = 64
    cmp_q_bwd: int = 64
    cmp_k_bwd: int = 64
    cmp_splits: int = 0
    win_q: int = 64
    win_k: int = 64
    win_q_bwd: int = 64
    win_k_bwd: int = 64
    score_q: int = 64
    slc_rows: int = 64
    slc_item_chunks: int = 32
    num_warps: int = 4
    num_stages: int = 2


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


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
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    checks.check_trailing("gates", gates, (b, t, hq, 3))
    checks.check_segment_ids(segment_ids, b, t)
    if cfg.videonsa_compat:
        return nsa_reference(q, k, v, gates, cfg, segment_ids=segment_ids,
                             compress_params=compress_params)
    bsz = block_sizes or BlockSizes()
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    g = hq // hkv
    scale = d**-0.5
    launch = dict(num_warps=bsz.num_warps, num_stages=bsz.num_stages, interpret=interpret)

    tiles = (bsz.cmp_q, bsz.cmp_q_bwd, bsz.win_q, bsz.win_k, bsz.win_q_bwd, bsz.win_k_bwd,
             bsz.score_q, cfg.block_size)
    tp = _round_up(t, math.lcm(*tiles))
    seg = (jnp.ones((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    segp = _pad_axis(seg, 1, tp)
    qp, kp, vp = (_pad_axis(x, 1, tp) for x in (q, k, v))

    # compressed branch
    k_cmp, v_cmp = compress_kv(k, v, cfg, compress_params)
    nc = k_cmp.shape[1]
    ncp = _round_up(nc, math.lcm(bsz.cmp_k, bsz.cmp_k_bwd))
    kcp, vcp = (_pad_axis(x.astype(q.dtype), 1, ncp) for x in (k_cmp, v_cmp))
    bseg = _pad_axis(_cmp_block_segments(seg, cfg), 1, ncp, value=-1)
    splits = bsz.cmp_splits or max(1, min(tp // bsz.cmp_q_bwd,
                                          -(-4 * 132 // (b * hkv * (ncp // bsz.cmp_k_bwd)))))
    p_cmp = BandParams(stride=cfg.cmp_stride, offset=cfg.cmp_block - 1, window=0, scale=scale,
                       block_q=bsz.cmp_q, block_k=bsz.cmp_k, block_q_bwd=bsz.cmp_q_bwd,
                       block_k_bwd=bsz.cmp_k_bwd, splits=splits, **launch)
    o_cmp, lse = banded_attention(qp, kcp, vcp, segp, bseg, p_cmp)

    # selection
    p_imp = dataclasses.replace(p_cmp, block_q=bsz.score_q)
    qs, kcs, lses = jax.lax.stop_gradient((qp, kcp, lse))
    imp = block_importance(qs, kcs, lses, segp, bseg, p_imp)
    idx = top_blocks(imp, segp, t, g, cfg)

    # selected branch
    rows = max(bsz.slc_rows, 1 << (g - 1).bit_length())
    p_slc = SelParams(block=cfg.block_size, scale=scale, rows=rows,
                      item_chunks=bsz.slc_item_chunks, **launch)
    o_slc = selected_attention(qp, kp, vp, segp, idx, p_slc)

    # sliding window
    if cfg.window:
        p_win = BandParams(stride=1, offset=0, window=cfg.window, scale=scale,
                           block_q=bsz.win_q, block_k=bsz.win_k, block_q_bwd=bsz.win_q_bwd,
                           block_k_bwd=bsz.win_k_bwd, **launch)
        o_swa = banded_attention(qp, kp, vp, segp, segp, p_win)[0]
    else:
        o_swa = jnp.zeros_like(qp)
    gp = _pad_axis(gates, 1, tp)
    return combine_branches(gp, o_cmp, o_slc, o_swa)[:, :t]


def nsa_indices(q: Array, k: Array, v: Array, cfg: NSAConfig, *,
                segment_ids: Array | None = None,
                compress_params: dict[str, Array] | None = None,
                block_sizes: BlockSizes | None = None,
                interpret: bool | None = None) -> Array:
    """The selection `idx: [B, T, Hkv, n]` the GPU path uses (for tests and analysis)."""
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    bsz = block_sizes or BlockSizes()
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    tp = _round_up(t, math.lcm(bsz.cmp_q, bsz.score_q, cfg.block_size))
    seg = (jnp.ones((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    segp = _pad_axis(seg, 1, tp)
    qp = _pad_axis(q, 1, tp)
    k_cmp, _ = compress_kv(k, v, cfg, compress_params)
    ncp = _round_up(k_cmp.shape[1], bsz.cmp_k)
    kcp = _pad_axis(k_cmp.astype(q.dtype), 1, ncp)
    bseg = _pad_axis(_cmp_block_segments(seg, cfg), 1, ncp, value=-1)
    p = BandParams(stride=cfg.cmp_stride, offset=cfg.cmp_block - 1, window=0, scale=d**-0.5,
                   block_q=bsz.cmp_q, block_k=bsz.cmp_k, num_warps=bsz.num_warps,
                   num_stages=bsz.num_stages, interpret=interpret)
    _, lse = banded_attention(qp, kcp, kcp, segp, bseg, p)
    imp = block_importance(qp, kcp, lse, segp, bseg, dataclasses.replace(p, block_q=bsz.score_q))
    return top_blocks(imp, segp, t, hq // hkv, cfg)[:, :t]
