"""Hybrid attention for one language-model layer: text queries dense, video queries NSA.

Clean form (`cfg.videonsa_compat=False`), as in `docs/architecture.md`:
  - a text query attends densely and causally to every earlier token;
  - a video query runs NSA over every earlier token (text and video), gates
    `sigmoid(logits / temperature)`;
  - which query is which comes from the token ids (`<|video_pad|>` positions).

VideoNSA-compatible form (`cfg.videonsa_compat=True`) reproduces the released code
(`Qwen2_5_VLMixNSA._mixed_attention` in VideoNSA's ms-swift fork):
  - vision tokens are those whose mRoPE positions are not all equal (`t == h == w` is text:
    `compat_vision_mask`); this also calls the first patch of an image/video "text";
  - NSA runs over the whole sequence with text q/k/v set to zero, the query heads padded
    `[q, q, 0]` to `16 * Hkv` so padded head p reads KV head `p // 16`, gates padded the same
    way, output `(o[:, :, :Hq] + o[:, :, Hq:2Hq]) / 2`;
  - gate logits are zeroed at text positions (gates 0.5 there);
  - a dense causal branch runs with vision queries set to zero; both outputs are summed at
    every position;
  - the NSA branches are the reference's with `videonsa_compat` (compressed blocks visible to
    their own and later queries); the top-k is fla-core 0.3.x's `parallel_nsa_topk`
    (`videonsa_topk` below), fed the compressed-attention log-sum-exp through VideoNSA's
    layout accident: flex_attention returns it as `[B, H, T]` and fla reads the same memory as
    `[B, T, H]`. `lse_layout="videonsa"` reproduces that (a reshape of the transposed array,
    i.e. the same memory read row-major as `[B, T, H]`); "correct" hands over the true
    `[B, T, H]` array. The default is "videonsa": the released weights were trained with it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from nsa_jax.attention.nsa import nsa_attention
from nsa_jax.attention.reference import (
    NSAConfig,
    combine_branches,
    compress_kv,
    compressed_attention,
    dense_attention,
    selected_attention,
    sliding_window_attention,
)

Array = jax.Array
COMPAT_GROUP = 16  # fla-core's minimum GQA group: VideoNSA pads query heads to 16 per KV head
_TOPK_CHUNK = 64


def gate_values(gate_logits: Array, temperature: float) -> Array:
    """`sigmoid(logits / temperature)` in f32: `[B, T, Hq, 3]` -> `[B, T, Hq, 3]`."""
    return jax.nn.sigmoid(gate_logits.astype(jnp.float32) / temperature)


def compat_vision_mask(position_ids: Array) -> Array:
    """VideoNSA's text/vision split: `[3, B, T]` mRoPE positions -> `[B, T]` bool (vision)."""
    t, h, w = position_ids[0], position_ids[1], position_ids[2]
    return ~((t == h) & (t == w))


def hybrid_attention(
    q: Array,
    k: Array,
    v: Array,
    gate_logits: Array,
    is_video: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    implementation: str = "auto",
    lse_layout: Literal["videonsa", "correct"] = "videonsa",
) -> Array:
    """One layer's attention: `q: [B, T, Hq, D]`, `k, v: [B, T, Hkv, D]` (RoPE applied),
    `gate_logits: [B, T, Hq, 3]` (before the temperature), `is_video: [B, T]` bool,
    `segment_ids: [B, T]` (0 = padding) or None. Returns `[B, T, Hq, D]` in `q.dtype`.
    """
    if cfg.videonsa_compat:
        return videonsa_mixed_attention(
            q, k, v, gate_logits, is_video, cfg, segment_ids=segment_ids, lse_layout=lse_layout
        )
    gates = gate_values(gate_logits, cfg.gate_temperature)
    o_nsa = nsa_attention(
        q, k, v, gates, cfg, segment_ids=segment_ids, implementation=implementation
    )
    o_dense = dense_attention(q, k, v, segment_ids)
    return jnp.where(is_video[:, :, None, None], o_nsa, o_dense).astype(q.dtype)


# --------------------------------------------------------------------------- VideoNSA compat


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


def videonsa_topk(q: Array, k_cmp: Array, lse: Array, cfg: NSAConfig) -> Array:
    """fla-core 0.3.x `parallel_nsa_topk` (the one VideoNSA pins): `idx: [B, T, Hkv, n]`.

    For query t in selection block `cur = t // l'` and KV head g: the current block scores
    `G` (probability 1 for each of the G heads of the group); each earlier block c scores
    `sum_h exp(q_h . k_c * scale - lse[t, h])` (no clamp: with the misread lse this is not a
    probability); later blocks are not candidates. The n highest candidates are taken (ties:
    lower block first; fla's bitonic sort leaves tie order unspecified); -1 fills empty slots.
    Needs `compress_block == compress_stride == block_size`, as VideoNSA uses.
    """
    if not cfg.cmp_block == cfg.cmp_stride == cfg.block_size:
        raise ValueError("videonsa_topk needs compress_block == compress_stride == block_size")
    b, t, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    n = cfg.num_selected
    q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
    c = min(_TOPK_CHUNK, t)
    pad = -t % c
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).astype(jnp.float32)
    lp = jnp.pad(lse, ((0, 0), (0, pad), (0, 0)))
    kf = k_cmp.astype(jnp.float32)
    j = jnp.arange(nc)

    def chunk(start: Array) -> Array:
        qc = jax.lax.dynamic_slice_in_dim(qp, start, c, 1).reshape(b, c, hkv, g, d)
        lc = jax.lax.dynamic_slice_in_dim(lp, start, c, 1).reshape(b, c, hkv, g)
        s = jnp.einsum("bckgd,bnkd->bckgn", qc, kf) * d**-0.5
        cur = ((start + jnp.arange(c)) // cfg.block_size)[None, :, None, None, None]
        p = jnp.where(j < cur, jnp.exp(s - lc[..., None]), 0.0)
        p = jnp.where(j == cur, 1.0, p)
        score = jnp.where(j[None, None, None] <= cur[..., 0], p.sum(3), -jnp.inf)
        top, idx = jax.lax.top_k(score, min(n, nc))
        idx = jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)
        return jnp.pad(idx, ((0, 0), (0, 0), (0, 0), (0, max(0, n - nc))), constant_values=-1)

    out = jax.lax.map(chunk, jnp.arange(0, t + pad, c))  # [steps, B, c, Hkv, n]
    return jnp.moveaxis(out, 0, 1).reshape(b, t + pad, hkv, n)[:, :t]


def videonsa_nsa(
    q: Array, k: Array, v: Array, gates: Array, cfg: NSAConfig, lse_layout: str
) -> Array:
    """NSA as VideoNSA's `nsa_func` computes it, on already padded heads `q: [B, T, Hp, D]`."""
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
