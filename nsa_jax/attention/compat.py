"""VideoNSA's hybrid layer reproduced exactly: its released weights give its outputs.

With `cfg.videonsa_compat=True`, `hybrid.hybrid_attention` runs this form, which reproduces
the released code (`Qwen2_5_VLMixNSA._mixed_attention` in VideoNSA's ms-swift fork):
  - vision tokens are those whose mRoPE positions are not all equal (`t == h == w` is text:
    `compat_vision_mask`); this also calls the first patch of an image/video "text";
  - NSA runs over the whole sequence with text q/k/v set to zero, the query heads padded
    `[q, q, 0]` to `16 * Hkv` so padded head p reads KV head `p // 16`, gates padded the same
    way, output `(o[:, :, :Hq] + o[:, :, Hq:2Hq]) / 2`;
  - gate logits are zeroed at text positions (gates 0.5 there);
  - a dense causal branch runs with vision queries set to zero; both outputs are summed at
    every position;
  - the NSA branches are the reference's with `videonsa_compat` (compressed blocks visible to
    their own and later queries); the top-k is fla's `parallel_nsa_topk`, i.e.
    `pallas_kernels.reference.videonsa_topk` (what `select_blocks` runs under compat), fed the
    compressed-attention log-sum-exp through VideoNSA's layout accident: flex_attention
    returns it as `[B, H, T]` and fla reads the same memory as `[B, T, H]`.
    `lse_layout="videonsa"` reproduces that (a reshape of the transposed array, i.e. the same
    memory read row-major as `[B, T, H]`); "correct" hands over the true `[B, T, H]` array,
    which makes this NSA exactly `nsa_reference` with `videonsa_compat`. The default is
    "videonsa": the released weights were trained with it. The accident lives here, not in
    the reference, because it is VideoNSA's glue between two libraries and depends on the
    padded head count, which only this layer knows.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from nsa_jax.attention.dense import dense_attention
from pallas_kernels.reference import (
    NSAConfig,
    combine_branches,
    compress_kv,
    compressed_attention,
    selected_attention,
    sliding_window_attention,
    videonsa_topk,
)

Array = jax.Array
COMPAT_GROUP = 16  # fla-core's minimum GQA group: VideoNSA pads query heads to 16 per KV head


def compat_vision_mask(position_ids: Array) -> Array:
    """VideoNSA's text/vision split: `[3, B, T]` mRoPE positions -> `[B, T]` bool (vision)."""
    t, h, w = position_ids[0], position_ids[1], position_ids[2]
    return ~((t == h) & (t == w))


def _pad_heads(x: Array, heads: int) -> Array:
    """`[B, T, Hq, ...]` -> `[B, T, heads, ...]` as `[x, x, zeros]` (VideoNSA's padding)."""
    zeros = jnp.zeros((*x.shape[:2], heads - 2 * x.shape[2], *x.shape[3:]), x.dtype)
    return jnp.concatenate([x, x, zeros], axis=2)


def videonsa_lse(lse: Array, layout: Literal["videonsa", "correct"]) -> Array:
    """The log-sum-exp `[B, T, H]` the top-k reads.

    "videonsa": flex_attention hands over `[B, H, T]`; fla indexes that memory as `[B, T, H]`,
    so element `(t, h)` is the flat `[H, T]` entry `t * H + h`, i.e. head `(t*H + h) // T`,
    time `(t*H + h) % T` of the true log-sum-exp.
    """
    if layout == "correct":
        return lse
    b, t, h = lse.shape
    return jnp.transpose(lse, (0, 2, 1)).reshape(b, t, h)


def videonsa_nsa(
    q: Array, k: Array, v: Array, gates: Array, cfg: NSAConfig, lse_layout: str
) -> Array:
    """NSA as VideoNSA's `nsa_func` computes it, on already padded heads `q: [B, T, Hp, D]`.

    With `lse_layout="correct"` this is `nsa_reference` under `videonsa_compat` (no segments).
    """
    k_cmp, v_cmp = compress_kv(k, v, cfg)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cfg)
    idx = videonsa_topk(q, k_cmp, videonsa_lse(lse, lse_layout), cfg)
    o_slc = selected_attention(q, k, v, idx, cfg)
    o_swa = sliding_window_attention(q, k, v, cfg.window, query_chunk=cfg.query_chunk)
    return combine_branches(gates, o_cmp, o_slc, o_swa)


def videonsa_mixed_attention(
    q: Array,
    k: Array,
    v: Array,
    gate_logits: Array,
    is_vision: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    lse_layout: Literal["videonsa", "correct"] = "videonsa",
) -> Array:
    """VideoNSA's `_mixed_attention` (see the module docstring). `is_vision: [B, T]` bool,
    normally `compat_vision_mask(position_ids)`. `segment_ids` only reaches the dense branch
    (VideoNSA's NSA call takes no padding mask)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    heads = COMPAT_GROUP * hkv
    if 2 * hq > heads:
        raise ValueError(
            f"videonsa_compat pads {hq} query heads as [q, q, 0] to {COMPAT_GROUP} per KV head "
            f"({heads}); needs 2 * Hq <= {heads}"
        )
    vis = is_vision[:, :, None, None]
    zero = jnp.zeros((), q.dtype)
    q_v, k_v, v_v = jnp.where(vis, q, zero), jnp.where(vis, k, zero), jnp.where(vis, v, zero)
    logits = jnp.where(vis, gate_logits.astype(jnp.float32) / cfg.gate_temperature, 0.0)
    gates = _pad_heads(jax.nn.sigmoid(logits), heads)
    o = videonsa_nsa(_pad_heads(q_v, heads), k_v, v_v, gates, cfg, lse_layout)
    o_nsa = (o[:, :, :hq].astype(jnp.float32) + o[:, :, hq : 2 * hq].astype(jnp.float32)) * 0.5
    o_dense = dense_attention(jnp.where(vis, zero, q), k, v, segment_ids)
    return (o_nsa + o_dense.astype(jnp.float32)).astype(q.dtype)
