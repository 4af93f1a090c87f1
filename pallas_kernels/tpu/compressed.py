"""Compressed attention and block selection on TPU: Pallas kernels with a custom_vjp.

References: `pallas_kernels.reference.compressed_attention` (`(o, lse)`, same outputs and
gradients) and `reference.select_blocks` (same indices).

Compressed attention is `block_sparse` attention over the compressed keys `[B, Nc, Hkv, D]`:
key `c` carries the position of its last token, `c*d + l - 1`, and the segment of its tokens
(-1 when they straddle two samples, so no query sees it), so the kernel's causal rule
`pos_k <= pos_q` is exactly "the block has ended". VideoNSA's reversed rule
(`t <= c*d + l - 1`) is the same kernel with both positions negated. Each query tile visits
the causal prefix of key tiles (or, reversed, the suffix): static lists, no wasted tiles. The
backward (dq; dk/dv over (key tile, query tile) pairs without atomics) is `block_sparse`'s;
the gradient reaches `k_cmp`, `v_cmp` and, through XLA's compression, `k` and `v`. `lse` is
differentiable too, but NSA only feeds it to the selection, which stops gradients.

Block selection needs the compressed-attention probabilities summed over the GQA group. They
need the finished `lse`, so they come from a second pass (`block_sparse.sparse_importance`):
the group sum is a `[block_q, block_q*G]` 0/1 matmul and the map from compressed to selection
blocks (NSA Eq. 9, `reference._cmp_to_sel_weights`) a matmul with the band of that map each key
tile touches (`selection_band`), both inside the kernel, so scores leave it per (token, KV
head, selection block). Forcing the current,
previous and first block and the top-n run in XLA over chunks of query tiles (`select_chunk`,
fewer when the chunk's scores would pass `select_bytes`), so the `[T, Hkv, Nsel]` score array
never exists at once: a chunk's scores stay under a fixed size at any T.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.numerics import NEG_INF, cdiv, round_up
from pallas_kernels.reference import (
    NSAConfig,
    checks,
    cmp_to_sel_weights,
    forced_scores,
    top_n_slots,
    videonsa_topk,
)
from pallas_kernels.reference.segments import as_segments, cmp_block_segments, segment_starts
from pallas_kernels.tiles import SUBLANES, CompressedBlockSizes
from pallas_kernels.tpu import block_sparse as bs
from pallas_kernels.tpu import layout
from pallas_kernels.tpu.tokens import Side, attend_tokens, kernel_inputs

Array = jax.Array


def sides(seg: Array, t: int, cfg: NSAConfig) -> tuple[Side, Side]:
    """Query and compressed-key mask inputs; positions negated for the reversed rule."""
    nc = cfg.num_cmp_blocks(t)
    last = jnp.arange(nc, dtype=jnp.int32) * cfg.cmp_stride + cfg.cmp_block - 1
    pos = jnp.arange(t, dtype=jnp.int32)
    sign = -1 if cfg.videonsa_compat else 1
    return Side(seg, sign * pos), Side(cmp_block_segments(seg, cfg), sign * last)


def prefix_lists(
    t: int, cfg: NSAConfig, bsz: CompressedBlockSizes, b: int, hkv: int
) -> bs.FwdLists:
    """Compressed-key tiles holding a block visible to some token of each query tile."""
    nq, nc = cdiv(t, bsz.block_q), cfg.num_cmp_blocks(t)
    first_q = np.arange(nq) * bsz.block_q
    last_q = np.minimum(first_q + bsz.block_q, t) - 1
    last_tok = np.arange(nc) * cfg.cmp_stride + cfg.cmp_block - 1
    if cfg.videonsa_compat:  # blocks ending at or after the tile's first token
        first_c = np.searchsorted(last_tok, first_q, side="left")
        lo = first_c // bsz.block_kv
        hi = np.where(first_c < nc, (nc - 1) // bsz.block_kv, lo - 1)
    else:  # blocks ending at or before the tile's last token
        n_vis = np.searchsorted(last_tok, last_q, side="right")
        lo, hi = np.zeros(nq, np.int64), (n_vis - 1) // bsz.block_kv
    return bs.range_lists(lo, hi, b, hkv)


def _check_cmp(q: Array, k_cmp: Array, cfg: NSAConfig) -> tuple[int, int, int, int, int]:
    """Checks `q [B, T, Hq, D]` against `k_cmp [B, Nc, Hkv, D]`; returns (B, T, Hq, Hkv, D)."""
    if len(getattr(k_cmp, "shape", ())) != 4:
        raise ValueError(f"k_cmp must have rank 4 [B, Nc, Hkv, D], got {k_cmp!r:.80}")
    hkv = k_cmp.shape[2]
    b, t, hq, _, d = checks.check_qkv(q, q[:, :, :hkv], q[:, :, :hkv])
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of k_cmp's heads ({hkv})")
    checks.check_trailing("k_cmp", k_cmp, (b, cfg.num_cmp_blocks(t), hkv, d))
    return b, t, hq, hkv, d


@functools.partial(jax.jit, static_argnames=("cfg", "block_sizes", "interpret"))
def compressed_attention(
    q: Array,
    k_cmp: Array,
    v_cmp: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    block_sizes: CompressedBlockSizes | None = None,
    interpret: object = None,
) -> tuple[Array, Array]:
    """Attention over compressed blocks: `o [B, T, Hq, D]` (q.dtype), `lse [B, T, Hq]` f32.

    Query `t` sees block `c` once it has ended (`c*d + l - 1 <= t`; reversed under
    `cfg.videonsa_compat`) when all its tokens are in the query's segment; a query that sees
    none gets `o = 0`, `lse = -inf`. Differentiable in q, k_cmp, v_cmp.
    """
    b, t, hq, hkv, d = _check_cmp(q, k_cmp, cfg)
    checks.check_trailing("v_cmp", v_cmp, k_cmp.shape)
    checks.check_segment_ids(segment_ids, b, t)
    bsz = block_sizes or CompressedBlockSizes()
    queries, keys = sides(as_segments(segment_ids, b, t), t, cfg)
    return attend_tokens(
        q,
        k_cmp.astype(q.dtype),  # MXU inputs in q's dtype; the kernels accumulate in f32
        v_cmp.astype(q.dtype),
        queries=queries,
        keys=keys,
        block_q=bsz.block_q,
        block_kv=bsz.block_kv,
        lists=prefix_lists(t, cfg, bsz, b, hkv),
        spec=bs.MaskSpec(),
        interpret=interpret,
        list_budget=bsz.list_budget,
    )


def top_blocks(
    score: Array, t_pos: Array, seg_q: Array, first: Array, cfg: NSAConfig, g: int
) -> Array:
    """The selection rule of `reference.select_blocks` on precomputed scores.

    `score [B, C, Hkv, Nsel]` for tokens at `t_pos [C]` with segments `seg_q [B, C]` and
    segment-first blocks `first [B, C]` -> `idx [B, C, Hkv, n]` int32 (-1 = empty). The
    current, previous and first block are forced; candidates start at or before the token
    inside its segment.
    """
    ns = score.shape[-1]
    cur = (t_pos // cfg.block_size)[None, :, None, None]
    live = (seg_q > 0)[:, :, None, None]
    score = forced_scores(score, jnp.arange(ns), cur, first[:, :, None, None], live, g)
    return top_n_slots(score, cfg.num_selected)


@dataclasses.dataclass(frozen=True)
class SelectionBand:
    """NSA Eq. 9 cut into key tiles: compressed-key tile `j` adds to selection blocks
    `[start[j], start[j] + band)` of an output `width` wide (lane multiples; static)."""

    weights: np.ndarray  # [Nc, Nsel], `reference._cmp_to_sel_weights`
    start: np.ndarray  # [Nk] int32
    band: int
    width: int


def selection_band(t: int, cfg: NSAConfig, block_kv: int) -> SelectionBand:
    w = cmp_to_sel_weights(t, cfg)
    nc, ns = w.shape
    nk = cdiv(nc, block_kv)
    lo, hi = np.zeros(nk, np.int64), np.zeros(nk, np.int64)
    for j in range(nk):
        cols = np.nonzero(w[j * block_kv : (j + 1) * block_kv].any(0))[0]
        if cols.size:
            lo[j], hi[j] = cols.min(), cols.max() + 1
    start = lo // 128 * 128
    band = round_up(int((hi - start).max()), 128)
    width = max(round_up(ns, 128), int(start.max()) + band)
    return SelectionBand(w, start.astype(np.int32), band, width)


def selection_proj(sb: SelectionBand, block_kv: int) -> Array:
    """The band of each key tile: `[Nk, K, band]` f32 (K padded to the sublane tile)."""
    nc = sb.weights.shape[0]
    nk = sb.start.shape[0]
    kp = round_up(block_kv, SUBLANES)
    w = np.zeros((nk * block_kv, sb.width + sb.band), np.float32)
    w[:nc, : sb.weights.shape[1]] = sb.weights
    tiles = np.zeros((nk, kp, sb.band), np.float32)
    for j, s in enumerate(sb.start):
        tiles[j, :block_kv] = w[j * block_kv : (j + 1) * block_kv, s : s + sb.band]
    return jnp.asarray(tiles)


def select_chunk_tiles(bsz: CompressedBlockSizes, b: int, hkv: int, nq: int, width: int) -> int:
    """Query tiles per top-n chunk: `select_chunk`, fewer where the chunk's f32 scores
    `[B, Hkv, tiles, block_q, width]` would pass `select_bytes`, at least one, at most `nq`."""
    per_tile = b * hkv * bsz.block_q * width * 4
    return max(1, min(bsz.select_chunk, nq, bsz.select_bytes // per_tile))


@functools.partial(jax.jit, static_argnames=("cfg", "block_sizes", "interpret"))
def select_blocks(
    q: Array,
    k_cmp: Array,
    lse: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    block_sizes: CompressedBlockSizes | None = None,
    interpret: object = None,
) -> Array:
    """Top-n selection blocks per query and KV head: `idx [B, T, Hkv, n]` int32, -1 = unused.

    Scores are the group-summed compressed-attention probabilities mapped to selection blocks
    (kernel `block_sparse.sparse_importance`); the rule is `top_blocks`. Not differentiable.
    Under `videonsa_compat` the selection is fla's, which scores blocks its own way
    (`reference.videonsa_topk`, in XLA: compat reproduces released weights, it is no fast path).
    """
    b, t, hq, hkv, d = _check_cmp(q, k_cmp, cfg)
    checks.check_trailing("lse", lse, (b, t, hq))
    checks.check_segment_ids(segment_ids, b, t)
    q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
    if cfg.videonsa_compat:
        return videonsa_topk(q, k_cmp, lse, cfg, segment_ids=segment_ids)
    bsz = block_sizes or CompressedBlockSizes()
    bq, g = bsz.block_q, hq // hkv
    seg = as_segments(segment_ids, b, t)
    queries, keys = sides(seg, t, cfg)
    lists = prefix_lists(t, cfg, bsz, b, hkv)
    x = kernel_inputs(  # the layouts of the attention pass (its value tiles go unused)
        q, k_cmp.astype(q.dtype), k_cmp.astype(q.dtype), queries=queries, keys=keys,
        block_q=bq, block_kv=bsz.block_kv, lists=lists, spec=bs.MaskSpec(), interpret=interpret,
    )  # fmt: skip
    lse_rows = layout.q_rows(jnp.maximum(lse, NEG_INF)[..., None], hkv, bq, 1)[..., 0]
    reduce_rows = jnp.asarray(np.arange(bq * g)[None] // g == np.arange(bq)[:, None], jnp.float32)
    sb = selection_band(t, cfg, bsz.block_kv)
    proj, ns = selection_proj(sb, bsz.block_kv), sb.weights.shape[1]
    first = segment_starts(seg) // cfg.block_size

    # chunks of `ct` query tiles: pad the tile axis, then map over chunks
    nq = x.q.shape[2]
    ct = select_chunk_tiles(bsz, b, hkv, nq, sb.width)
    nch = cdiv(nq, ct)

    def tiles(a: Array, axis: int) -> Array:  # pad the query-tile axis to nch * ct
        return jnp.pad(a, [(0, 0)] * axis + [(0, nch * ct - nq)] + [(0, 0)] * (a.ndim - axis - 1))

    q_all, lse_all = tiles(x.q, 2), tiles(lse_rows, 2)
    qseg_all, qpos_all = tiles(x.meta.q_seg, 1), tiles(x.meta.q_pos, 0)
    kv_list = tiles(x.meta.kv_list.reshape(b, hkv, nq, lists.num_u), 2)
    kv_count = tiles(x.meta.kv_count.reshape(b, hkv, nq), 2)
    tp = nch * ct * bq
    segp = jnp.pad(seg, [(0, 0), (0, tp - t)])
    firstp = jnp.pad(first, [(0, 0), (0, tp - t)])

    def chunk(c: Array) -> Array:
        def sl(a: Array, axis: int) -> Array:
            return jax.lax.dynamic_slice_in_dim(a, c * ct, ct, axis)

        chunk_lists = bs.FwdLists(
            sl(kv_list, 2).reshape(-1), sl(kv_count, 2).reshape(-1), lists.num_u
        )
        sc = bs.sparse_importance(
            sl(q_all, 2), sl(qseg_all, 1), sl(qpos_all, 0), sl(lse_all, 2), reduce_rows,
            x.k, x.meta.k_seg, x.meta.k_pos, proj, jnp.asarray(sb.start // 128), sb.width,
            chunk_lists,
            scale=x.static.scale, spec=x.static.spec, interpret=x.static.interpret,
            budget=bsz.list_budget,
        )  # [B, Hkv, ct, bq, W]  # fmt: skip
        sc = sc.transpose(0, 2, 3, 1, 4).reshape(b, ct * bq, hkv, -1)[..., :ns]
        start = c * ct * bq
        t_pos = start + jnp.arange(ct * bq, dtype=jnp.int32)
        seg_c = jax.lax.dynamic_slice_in_dim(segp, start, ct * bq, 1)
        first_c = jax.lax.dynamic_slice_in_dim(firstp, start, ct * bq, 1)
        return top_blocks(sc, t_pos, seg_c, first_c, cfg, g)

    idx = jax.lax.map(chunk, jnp.arange(nch, dtype=jnp.int32))  # [nch, B, ct*bq, Hkv, n]
    return jnp.moveaxis(idx, 0, 1).reshape(b, tp, hkv, -1)[:, :t]
