"""Hybrid attention for one language-model layer: text rows dense, video rows NSA, routed.

The layer takes its settings whole, as an `AttentionConfig` (`attn`).

Clean form (`attn.nsa.videonsa_compat=False`), as in `docs/architecture.md`:
  - a video query (`is_video`, from the token ids) runs NSA over every earlier token of its
    sample (text and video), gates `sigmoid(logits / temperature)`, on the NSA backend chosen
    by `attn.implementation` (the Pallas GPU / TPU kernels at `attn`'s tile sizes, or the
    reference);
  - a text query attends densely and causally to every earlier token of its sample. Only the
    text rows are computed: their positions are gathered into `text_rows` slots (a static,
    bucketed count, `text_row_bucket`), attended by `dense.dense_rows` (flash attention in
    O(T) memory: the Pallas banded kernel on GPU, XLA on TPU / CPU) and scattered back.
The result equals "dense and NSA over every row, then `where(is_video, nsa, dense)`" while
costing one NSA pass plus `text_rows / T` of a dense layer, with no `[T, T]` array.

The VideoNSA-compatible form (`attn.nsa.videonsa_compat=True`) is `compat.py`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax.attention.compat import videonsa_mixed_attention
from nsa_jax.attention.config import AttentionConfig
from nsa_jax.attention.dense import segments_or_ones, text_attention
from nsa_jax.attention.nsa import resolve_implementation
from pallas_kernels.reference import checks

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
    attn: AttentionConfig,
    *,
    segment_ids: Array | None = None,
    text_rows: int | None = None,
) -> Array:
    """One layer's attention: `q: [B, T, Hq, D]`, `k, v: [B, T, Hkv, D]` (RoPE applied),
    `gate_logits: [B, T, Hq, 3]` (before the temperature), `is_video: [B, T]` bool, `attn`
    the settings (`attn.nsa` set), `segment_ids: [B, T]` (0 = padding) or None (one sample,
    no padding). `text_rows`: static slots for the text rows of any batch row (None: `T`,
    always enough). Returns `[B, T, Hq, D]` in `q.dtype`.
    """
    cfg = attn.nsa
    if cfg is None:
        raise ValueError("hybrid_attention needs attn.nsa (NSA settings); got None")
    b, t = q.shape[:2]
    rows = t if text_rows is None else min(int(text_rows), t)
    seg = segments_or_ones(segment_ids, b, t)
    if cfg.videonsa_compat:
        return videonsa_mixed_attention(
            q, k, v, gate_logits, is_video, cfg, segment_ids=segment_ids, text_rows=rows,
            lse_layout=attn.lse_layout,
        )
    gates = gate_values(gate_logits, cfg.gate_temperature)
    checks.check_nsa_inputs(q, k, v, gates, segment_ids)
    o_nsa = resolve_implementation(attn)(q, k, v, gates, cfg, segment_ids=segment_ids)
    o_text = text_attention(q, k, v, ~is_video & (seg > 0), rows, segment_ids)
    return jnp.where(is_video[:, :, None, None], o_nsa, o_text).astype(q.dtype)
