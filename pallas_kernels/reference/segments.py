"""Segments and visibility: which keys a query may see in a packed, padded batch.

`segment_ids: [B, T]` ints, 0 = padding; packed samples never attend across segments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference.config import NSAConfig

Array = jax.Array


def as_segments(segment_ids: Array | None, b: int, t: int) -> Array:
    """Segment ids `[B, T]` int32; all ones (one sample, no padding) when absent."""
    if segment_ids is None:
        return jnp.ones((b, t), jnp.int32)
    return segment_ids.astype(jnp.int32)


def segment_starts(seg: Array) -> Array:
    """`[B, T]` position of the first token of each token's segment."""
    t = seg.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)
    is_start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(is_start, pos[None], 0), axis=1)


def cmp_block_segments(seg: Array, cfg: NSAConfig) -> Array:
    """`[B, Nc]` segment of each compressed block, or -1 when the block mixes segments."""
    b, t = seg.shape
    nc = cfg.num_cmp_blocks(t)
    tok = jnp.arange(nc)[:, None] * cfg.cmp_stride + jnp.arange(cfg.cmp_block)[None]
    present = tok < t
    s = seg[:, jnp.minimum(tok, t - 1)]  # [B, Nc, l]
    lo = jnp.where(present, s, jnp.iinfo(jnp.int32).max).min(-1)
    hi = jnp.where(present, s, jnp.iinfo(jnp.int32).min).max(-1)
    return jnp.where(lo == hi, lo, -1)


def cmp_visible(t_pos: Array, seg_q: Array, blk_seg: Array, cfg: NSAConfig) -> Array:
    """`[B, C, Nc]`: may query at `t_pos` (`[C]`) see compressed block c?"""
    nc = blk_seg.shape[1]
    last = jnp.arange(nc) * cfg.cmp_stride + cfg.cmp_block - 1  # last token of each block
    # VideoNSA's released mask lets a query see its own and later blocks
    causal = t_pos[:, None] <= last[None] if cfg.videonsa_compat else last[None] <= t_pos[:, None]
    return causal[None] & (blk_seg[:, None, :] == seg_q[:, :, None]) & (seg_q[:, :, None] > 0)
