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

The VideoNSA-compatible form (`attn.nsa.videonsa_compat=True`) is `compat.py`'s; its text
rows are routed the same way (by its own text/vision split).

The routing is this module's: the host counts the text rows of a batch and buckets the count
(`count_text_rows`, `text_row_bucket`: a static shape per bucket); in the program
`text_attention` gathers them (`gather_rows`, `take_rows`), attends them densely
(`dense.dense_rows`) and scatters them back (`put_rows`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.attention.compat import videonsa_mixed_attention
from nsa_jax.attention.config import AttentionConfig
from nsa_jax.attention.dense import dense_rows
from nsa_jax.attention.nsa import resolve_implementation
from pallas_kernels.reference.segments import as_segments

Array = jax.Array
MIN_TEXT_ROWS = 16  # the smallest bucket of gathered text rows


def text_row_bucket(count: int, t: int) -> int:
    """Static slot count for `count` text rows in a row of `t` tokens: the next power of two
    (at least `MIN_TEXT_ROWS`), capped at `t`, so few distinct shapes get compiled."""
    return min(t, max(MIN_TEXT_ROWS, 1 << max(0, int(count) - 1).bit_length()))


def count_text_rows(is_text: np.ndarray) -> int:
    """The most text rows of any batch row: `is_text: [B, T]` bool (host NumPy)."""
    return int(np.asarray(is_text).sum(-1).max(initial=0))


def gather_rows(mask: Array, rows: int) -> Array:
    """Positions of the True entries of `mask: [B, T]`, in order, in `rows` slots:
    `[B, rows]` int32, `-1` in unused slots. Entries beyond `rows` are dropped: `rows` must
    be at least the largest count (`text_row_bucket(count_text_rows(mask), T)`)."""
    def one(m: Array) -> Array:
        return jnp.nonzero(m, size=rows, fill_value=-1)[0].astype(jnp.int32)

    return jax.vmap(one)(mask)


def take_rows(x: Array, rows: Array) -> Array:
    """`x: [B, T, ...]` at `rows: [B, R]` (`-1` reads row 0) -> `[B, R, ...]`."""
    idx = jnp.maximum(rows, 0).reshape(*rows.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, idx, axis=1)


def put_rows(out: Array, rows: Array, values: Array) -> Array:
    """`out: [B, T, ...]` with `values: [B, R, ...]` written at `rows: [B, R]` (slots with
    `-1` are dropped)."""
    b, t = out.shape[:2]
    safe = jnp.where(rows >= 0, rows, t)  # out of range: dropped
    bidx = jnp.broadcast_to(jnp.arange(b)[:, None], rows.shape)
    return out.at[bidx, safe].set(values.astype(out.dtype), mode="drop")


def text_attention(q: Array, k: Array, v: Array, is_text: Array, text_rows: int,
                   segment_ids: Array | None, implementation: str | None = None) -> Array:
    """Dense causal attention of the text rows only: `[B, T, Hq, D]`, zeros at other rows.
    `is_text: [B, T]` bool; `text_rows` the static slot count; `implementation` as in
    `dense_rows`."""
    rows = gather_rows(is_text, text_rows)
    o_rows = dense_rows(take_rows(q, rows), rows, k, v, segment_ids,
                        implementation=implementation)
    return put_rows(jnp.zeros_like(q), rows, o_rows)


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
    seg = as_segments(segment_ids, b, t)
    o_text = text_attention(q, k, v, ~is_video & (seg > 0), rows, segment_ids)
    if cfg.videonsa_compat:
        return videonsa_mixed_attention(
            q, k, v, gate_logits, is_video, cfg, o_text, segment_ids=segment_ids,
            lse_layout=attn.lse_layout,
        )
    gates = gate_values(gate_logits, cfg.gate_temperature)
    o_nsa = resolve_implementation(attn)(q, k, v, gates, cfg, segment_ids=segment_ids)
    return jnp.where(is_video[:, :, None, None], o_nsa, o_text).astype(q.dtype)
