"""Model FLOPs of a training step, NSA-aware, and model FLOPs utilisation (MFU).

Counted per batch row from the host batch: matmul FLOPs (2 per multiply-add) of the language
model's projections for every real token, of the vision tower for every real patch, of the LM
head for the answer tokens only (the loss computes no other logits), and attention by what each
query needs: a text query (or any query of a dense layer) attends causally to every earlier
token of its sample; a video query of a hybrid layer attends to NSA's compressed, selected and
window keys (`attention.flops.nsa_branch_keys`, per position). Training = 3 x forward
(backward twice the forward); rematerialisation is not counted, as MFU conventions go.
"""

from __future__ import annotations

import numpy as np

from nsa_jax.attention.flops import nsa_branch_keys
from nsa_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device by `device_kind` substring (vendor figures, no sparsity).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Per-device peak FLOP/s: the override, else the table's entry, else None (unknown)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, value in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def language_flops(cfg: ModelConfig, positions: np.ndarray, is_video: np.ndarray) -> float:
    """Forward FLOPs of the decoder layers for one row's real tokens (no LM head).

    Args:
      positions: `[n]` each real token's index within its own sample.
      is_video: `[n]` whether the token is a video placeholder (an NSA query).
    """
    t = cfg.text
    hd, hq, hkv, h = t.head_dim, t.num_attention_heads, t.num_key_value_heads, t.hidden_size
    proj = h * hq * hd + 2 * h * hkv * hd + hq * hd * h + 3 * h * t.intermediate_size
    gates = h * h + h * 3 * hq
    n = len(positions)
    total = attention_flops(cfg, positions, is_video)
    for layer in range(t.num_hidden_layers):
        total += 2 * n * (proj + (gates if cfg.uses_nsa(layer) else 0))
    return total


def attention_flops(cfg: ModelConfig, positions: np.ndarray, is_video: np.ndarray) -> float:
    """The attention's share of `language_flops` (scores and values over the keys each query
    attends to, every layer)."""
    t = cfg.text
    causal = np.asarray(positions, np.int64) + 1
    dense_keys = float(causal.sum())
    hybrid_keys = dense_keys
    if cfg.nsa is not None:
        nsa = sum(nsa_branch_keys(positions, cfg.nsa))
        hybrid_keys = float(np.where(is_video, nsa, causal).sum())
    return sum(4 * t.num_attention_heads * t.head_dim
               * (hybrid_keys if cfg.uses_nsa(layer) else dense_keys)
               for layer in range(t.num_hidden_layers))


def vision_flops(cfg: ModelConfig, grids: np.ndarray) -> float:
    """Forward FLOPs of the vision tower for the videos `grids: [V, 3]` (zero rows skipped):
    patch embedding, each block's projections and attention (within a window of
    `window_size` pixels, or within the frame at `fullatt_block_indexes`), the merger."""
    v = cfg.vision
    c, unit = v.hidden_size, v.spatial_merge_size**2
    win = (v.window_size // v.patch_size) ** 2  # patches per full window
    total = 0.0
    for tt, hh, ww in np.asarray(grids).reshape(-1, 3):
        if tt == 0:
            continue
        n = int(tt * hh * ww)
        frame = int(hh * ww)
        total += 2 * n * v.patch_dim * c
        for block in range(v.depth):
            keys = frame if block in v.fullatt_block_indexes else min(win, frame)
            total += 2 * n * (4 * c * c + 3 * c * v.intermediate_size) + 4 * n * keys * c
        total += 2 * (n // unit) * (unit * c * unit * c + unit * c * v.out_hidden_size)
    return total


def batch_train_flops(cfg: ModelConfig, batch: dict[str, np.ndarray], answer_tokens: int) -> float:
    """Training FLOPs (3 x forward) of one pipeline batch (`collate`'s layout)."""
    total = 0.0
    seg, pos, ids = batch["segment_ids"], batch["positions"], batch["input_ids"]
    for r in range(seg.shape[0]):
        real = seg[r] > 0
        total += language_flops(cfg, pos[r][real], ids[r][real] == cfg.video_token_id)
        total += vision_flops(cfg, batch["video_grid_thw"][r])
    total += 2 * answer_tokens * cfg.text.hidden_size * cfg.text.vocab_size
    return 3 * total


def batch_attention_flops(cfg: ModelConfig, batch: dict[str, np.ndarray]) -> float:
    """The decoder layers' attention share of `batch_train_flops` (3 x forward)."""
    seg, pos, ids = batch["segment_ids"], batch["positions"], batch["input_ids"]
    return 3 * sum(attention_flops(cfg, pos[r][seg[r] > 0],
                                   ids[r][seg[r] > 0] == cfg.video_token_id)
                   for r in range(seg.shape[0]))
