"""VideoNSA's selection: fla's `parallel_nsa_topk` as the released code runs it.

`select_blocks` runs it under `NSAConfig.videonsa_compat`; the rest of VideoNSA's arithmetic
(head padding, zeroed text rows, the lse layout) is the model's, in `nsa_jax.attention.compat`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.numerics import round_up
from pallas_kernels.reference import checks
from pallas_kernels.reference.chunks import (
    cmp_logits,
    map_query_chunks,
    pad_time,
    query_chunk_size,
    time_slice,
)
from pallas_kernels.reference.config import FlaTopk, NSAConfig
from pallas_kernels.reference.segments import as_segments, segment_starts

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "fla_version"))
def videonsa_topk(
    q: Array,
    k_cmp: Array,
    lse: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    fla_version: FlaTopk | None = None,
) -> Array:
    """fla's `parallel_nsa_topk`, the selection of VideoNSA (`select_blocks` under compat).

    `q [B, T, Hq, D]`, `k_cmp [B, Nc, Hkv, D]`, `lse [B, T, Hq]` (read as given: the caller
    decides its layout) -> `idx [B, T, Hkv, n]` int32, -1 = unused. Needs `l = d = l'`.

    fla computes its own scores and ignores which compressed blocks the compressed branch
    showed the query. For query t in block `cur = t // l'` and KV head g, candidates are the
    blocks `first <= j <= cur` (`first`: the block of the segment's first token; 0 without
    `segment_ids`), scored by the sum over the G heads of the group of
      - 1 for a forced block: `first`, `cur - 1` and `cur` in fla 0.3.1 (and every release
        since), only `cur` in fla <= 0.3.0;
      - `exp(q_h . k_j / sqrt(D) - lse[t, h])` for any other (earlier) block, unclamped: with
        VideoNSA's mask the lse sums over the query's own and later blocks, so this is no
        probability, may exceed 1, and can push a forced block (score G) out.
    `fla_version=None` follows `cfg.fla_topk` ("0.3.0" unless set).
    The n highest are taken (ties: lower block first; fla's bitonic sort leaves their order
    unspecified); -1 fills slots beyond the candidates. With `segment_ids`, each segment is
    its own sequence on the row's block grid (fla's `cu_seqlens` mode when segments start on
    block multiples); padding queries get -1. Not differentiable.
    """
    if not cfg.cmp_block == cfg.cmp_stride == cfg.block_size:
        raise ValueError(
            "videonsa_compat selection (fla's top-k scores compressed blocks as selection "
            "blocks) needs compress_block == compress_stride == block_size, got "
            f"{cfg.cmp_block}, {cfg.cmp_stride}, {cfg.block_size}"
        )
    fla_version = cfg.fla_topk if fla_version is None else fla_version
    if fla_version not in ("0.3.1", "0.3.0"):
        raise ValueError(f"fla_version must be '0.3.1' or '0.3.0', got {fla_version!r}")
    b, t, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    n = cfg.num_selected
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of k_cmp's heads ({hkv})")
    checks.check_trailing("k_cmp", k_cmp, (b, cfg.num_cmp_blocks(t), hkv, d))
    checks.check_trailing("lse", lse, (b, t, hq))
    q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
    g = hq // hkv
    seg = as_segments(segment_ids, b, t)
    c = query_chunk_size(t, cfg, 4 * hq * nc * 4)
    tp = round_up(t, c)
    qp, segp, lsep = pad_time(q, tp), pad_time(seg, tp), pad_time(lse, tp)
    firstp = pad_time(segment_starts(seg) // cfg.block_size, tp)
    j = jnp.arange(nc)[None, None, None]  # [1, 1, 1, Nc]

    def chunk(start: Array) -> tuple[Array]:
        s = cmp_logits(qp, k_cmp, start, c, hkv)  # [B, C, Hkv, G, Nc]
        lse_c = time_slice(lsep, start, c).reshape(b, c, hkv, g)[..., None]
        cur = ((start + jnp.arange(c)) // cfg.block_size)[None, :, None, None]  # [1, C, 1, 1]
        first = time_slice(firstp, start, c)[:, :, None, None]  # [B, C, 1, 1]
        live = (time_slice(segp, start, c) > 0)[:, :, None, None]
        cand = (j >= first) & (j <= cur) & live  # [B, C, 1, Nc]
        forced = j == cur
        if fla_version == "0.3.1":
            forced = forced | (j == first) | (j == cur - 1)
        # fla sets logits of blocks from `cur` on to -inf before the exp (so they add 0) and
        # overrides forced blocks with 1 per head afterwards
        p = jnp.where((j < cur)[..., None, :], jnp.exp(s - lse_c), 0.0).sum(3)  # [B,C,Hkv,Nc]
        score = jnp.where(cand, jnp.where(forced, float(g), p), -jnp.inf)
        top, idx = jax.lax.top_k(score, min(n, nc))
        idx = jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)
        return (jnp.pad(idx, [(0, 0)] * 3 + [(0, max(0, n - nc))], constant_values=-1),)

    (idx,) = map_query_chunks(chunk, t, c)
    return idx
