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
    every position. A zero query attends uniformly, so at a vision row that branch is the mean
    of the values up to the row (a cumulative sum here); the text rows come from the hybrid
    layer's routing (`hybrid.text_attention`, the rows gathered, attended densely and
    scattered back): O(T) memory;
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
Segments: every branch takes `segment_ids`, so packed samples do not attend across. The
"videonsa" layout's transposed read mixes log-sum-exps of the whole row, i.e. of every sample
packed in it, so packing (more than one sample per row) is refused under that layout when the
segment ids are concrete (the model checks them on the host); traced ones cannot be read, so a
packed row's output is NaN instead of a silent mix (`jax_debug_nans` finds it). Padding alone
is accepted.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import (
    NSAConfig,
    combine_branches,
    compress_kv,
    compressed_attention,
    selected_attention,
    sliding_window_attention,
    videonsa_topk,
)
from pallas_kernels.reference.segments import as_segments, segment_starts

Array = jax.Array
COMPAT_GROUP = 16  # fla-core's minimum GQA group: VideoNSA pads query heads to 16 per KV head


def compat_vision_mask(position_ids: Array) -> Array:
    """VideoNSA's text/vision split: `[3, B, T]` mRoPE positions -> `[B, T]` bool (vision).
    Jax or host NumPy arrays alike."""
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
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    cfg: NSAConfig,
    lse_layout: str,
    segment_ids: Array | None = None,
) -> Array:
    """NSA as VideoNSA's `nsa_func` computes it, on already padded heads `q: [B, T, Hp, D]`,
    `segment_ids: [B, T]` or None.

    With `lse_layout="correct"` this is `nsa_reference` under `videonsa_compat`.
    """
    k_cmp, v_cmp = compress_kv(k, v, cfg)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=segment_ids)
    idx = videonsa_topk(q, k_cmp, videonsa_lse(lse, lse_layout), cfg, segment_ids=segment_ids)
    o_slc = selected_attention(q, k, v, idx, cfg, segment_ids=segment_ids)
    o_swa = sliding_window_attention(
        q, k, v, cfg.window, segment_ids=segment_ids, query_chunk=cfg.query_chunk
    )
    return combine_branches(gates, o_cmp, o_slc, o_swa)


def packed_rows(segment_ids: Array) -> Array:
    """`[B]` bool: the rows of `segment_ids: [B, T]` that hold two different positive ids."""
    live = segment_ids > 0
    first = jnp.where(live, segment_ids, jnp.iinfo(jnp.int32).max).min(-1)
    last = jnp.where(live, segment_ids, 0).max(-1)
    return live.any(-1) & (first != last)


def check_unpacked(segment_ids: Array | None, lse_layout: str) -> None:
    """Refuses packed rows (`packed_rows`) under the "videonsa" lse layout, whose transposed
    read mixes samples; traced ids cannot be read and pass (`compat_mixed_attention` then
    returns NaN on the packed rows)."""
    if segment_ids is None or lse_layout != "videonsa" or isinstance(segment_ids, jax.core.Tracer):
        return
    if np.any(np.asarray(packed_rows(jnp.asarray(segment_ids)))):
        raise ValueError(
            "videonsa_compat with lse_layout='videonsa' cannot pack samples: the released "
            "code's transposed log-sum-exp read mixes the samples of a row; pass one sample "
            "per row (padding is fine) or lse_layout='correct'"
        )


def causal_mean(v: Array, seg: Array, hq: int) -> Array:
    """What attention with a zero query returns: at row t the mean of `v` over the rows of
    t's segment up to t. `v: [B, T, Hkv, D]`, `seg: [B, T]` -> `[B, T, Hq, D]` f32 (zeros at
    padding rows); query head h reads KV head `h // (Hq / Hkv)`."""
    b, t, hkv, d = v.shape
    total = jnp.cumsum(v.astype(jnp.float32), axis=1)
    start = segment_starts(seg)
    before = jnp.where(
        (start > 0)[..., None, None],
        jnp.take_along_axis(total, jnp.maximum(start - 1, 0)[..., None, None], axis=1),
        0.0,
    )
    count = (jnp.arange(t)[None] - start + 1).astype(jnp.float32)
    mean = (total - before) / count[..., None, None]
    mean = jnp.where((seg > 0)[..., None, None], mean, 0.0)
    return jnp.repeat(mean, hq // hkv, axis=2)


def videonsa_mixed_attention(
    q: Array,
    k: Array,
    v: Array,
    gate_logits: Array,
    is_vision: Array,
    cfg: NSAConfig,
    o_text: Array,
    *,
    segment_ids: Array | None = None,
    lse_layout: Literal["videonsa", "correct"] = "videonsa",
) -> Array:
    """VideoNSA's `_mixed_attention` (see the module docstring). `is_vision: [B, T]` bool,
    normally `compat_vision_mask(position_ids)`; `o_text: [B, T, Hq, D]` the dense causal
    attention of the text rows (`~is_vision`, live), zeros at the other rows (the hybrid
    layer's `text_attention`); `segment_ids: [B, T]` (0 = padding) or None. The NSA branch
    is the jnp reference on every backend: compat's compressed mask, which shows a query its
    own and later blocks, has no kernel."""
    check_unpacked(segment_ids, lse_layout)
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
    o = videonsa_nsa(_pad_heads(q_v, heads), k_v, v_v, gates, cfg, lse_layout, segment_ids)
    o_nsa = (o[:, :, :hq].astype(jnp.float32) + o[:, :, hq : 2 * hq].astype(jnp.float32)) * 0.5
    seg = as_segments(segment_ids, b, t)
    o_dense = jnp.where(vis, causal_mean(v, seg, hq), o_text.astype(jnp.float32))
    out = (o_nsa + o_dense).astype(q.dtype)
    if lse_layout == "videonsa" and isinstance(segment_ids, jax.core.Tracer):
        # not refused before the call (the ids are unknown): NaN, not a silent mix of samples
        out = jnp.where(packed_rows(segment_ids)[:, None, None, None], jnp.nan, out)
    return out
