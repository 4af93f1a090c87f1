"""Hybrid attention for one language-model layer: text queries dense, video queries NSA.

Clean form (`cfg.videonsa_compat=False`), as in `docs/architecture.md`:
  - a text query attends densely and causally to every earlier token;
  - a video query runs NSA over every earlier token (text and video), gates
    `sigmoid(logits / temperature)`;
  - which query is which comes from the token ids (`<|video_pad|>` positions).

The VideoNSA-compatible form (`cfg.videonsa_compat=True`) is `compat.py`'s.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from nsa_jax.attention.compat import videonsa_mixed_attention
from nsa_jax.attention.dense import dense_attention
from nsa_jax.attention.nsa import nsa_attention
from pallas_kernels.reference import NSAConfig

Array = jax.Array


def gate_values(gate_logits: Array, temperature: float) -> Array:
    """`sigmoid(logits / temperature)` in f32: `[B, T, Hq, 3]` -> `[B, T, Hq, 3]`."""
    return jax.nn.sigmoid(gate_logits.astype(jnp.float32) / temperature)


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
