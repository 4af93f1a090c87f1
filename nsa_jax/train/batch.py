"""From the grain pipeline's batches (host NumPy, see docs/data.md) to the step's arrays.

`model_batch` adds what the model needs besides the pipeline's arrays: each row's vision index
arrays (`VisionInputs`, computed on the host from the grids and padded to the row's `P` patch
slots) and the answer-token targets of the loss (`loss.answer_targets`). Every array keeps the
batch as its leading axis, so the whole batch shards over (`data`, `fsdp`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from nsa_jax.config import ModelConfig
from nsa_jax.model.vision import VisionInputs
from nsa_jax.model.vlm import VideoRows, text_row_slots
from nsa_jax.train.loss import answer_targets
from pallas_kernels.numerics import round_up

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelBatch:
    """One micro-batch as the step takes it (`B` rows of `L` tokens, `P = 4 L` patch slots,
    `K` answer slots per row).

    Attributes:
      input_ids, segment_ids: int32 `[B, L]` (segment 0 = padding).
      position_ids: int32 `[B, 3, L]` mRoPE positions.
      videos: `VideoRows` (pixels `[B, P, patch_dim]`, vision index arrays `[B, ...]`).
      loss_positions, loss_targets: int32 `[B, K]`; loss_weights: f32 `[B, K]`.
      text_rows: the hybrid layers' static text-row slots (`vlm.text_row_slots`), or None.
    """

    input_ids: Array | np.ndarray
    segment_ids: Array | np.ndarray
    position_ids: Array | np.ndarray
    videos: VideoRows
    loss_positions: Array | np.ndarray
    loss_targets: Array | np.ndarray
    loss_weights: Array | np.ndarray
    text_rows: int | None = None

    @property
    def answer_tokens(self) -> int:
        """Supervised tokens in the batch (host arrays only)."""
        return int(np.asarray(self.loss_weights).sum())


jax.tree_util.register_dataclass(
    ModelBatch,
    data_fields=["input_ids", "segment_ids", "position_ids", "videos", "loss_positions",
                 "loss_targets", "loss_weights"],
    meta_fields=["text_rows"],
)


def layout_bucket(n: int) -> int:
    """A static size for `n` segments (or patches per segment): `n` rounded up to an eighth
    of its power of two, so a batch's layouts waste at most ~12% and few shapes compile."""
    n = max(1, int(n))
    return round_up(n, 1 << max(0, n.bit_length() - 3))


def row_vision_inputs(grids: np.ndarray, slots: int, cfg: ModelConfig) -> list[VisionInputs]:
    """Vision index arrays of each batch row's videos (`grids: [B, V, 3]`, zero rows = no
    video) inside the row's `slots` patch slots, with one static layout shape for the batch
    (`VisionInputs.padded`): windows hold at most `(window_size / patch_size)^2` patches; the
    window count, the frame count and the frame length are bucketed (`layout_bucket`)."""
    v = cfg.vision
    rows = []
    for g in np.asarray(grids).reshape(len(grids), -1, 3):
        g = g[g[:, 0] > 0]
        rows.append(VisionInputs.from_grid(g, v) if g.shape[0] else VisionInputs.empty())
    for b, r in enumerate(rows):
        if r.perm.size > slots:
            raise ValueError(f"batch row {b} has {r.perm.size} patches but only {slots} "
                             "patch slots")
    window = (layout_bucket(max(r.window.lengths.size for r in rows)),
              (v.window_size // v.patch_size) ** 2)
    frame = (layout_bucket(max(r.frame.lengths.size for r in rows)),
             layout_bucket(max(r.frame.lengths.max(initial=1) for r in rows)))
    return [r.padded(slots, window, frame, v.spatial_merge_size**2) for r in rows]


def model_batch(batch: dict[str, np.ndarray], cfg: ModelConfig) -> ModelBatch:
    """A pipeline batch (`nsa_jax.data.pipeline.collate`; made with
    `rope_index_fn=rope_index_for(cfg)`) -> the step's `ModelBatch` (NumPy); `K` is the
    `answer_bucket` of the row with the most answer tokens."""
    if "position_ids" not in batch:
        raise ValueError("the batch has no position_ids: build the dataset with "
                         "rope_index_fn=rope_index_for(model_config)")
    pixels = batch["pixel_values_videos"]
    slots = pixels.shape[1]
    rows = row_vision_inputs(batch["video_grid_thw"], slots, cfg)
    inputs = jax.tree.map(lambda *xs: np.stack(xs), *rows)
    positions, targets, weights = answer_targets(batch["labels"], batch["segment_ids"])
    ids = batch["input_ids"].astype(np.int32)
    seg = batch["segment_ids"].astype(np.int32)
    pos = batch["position_ids"].astype(np.int32)
    return ModelBatch(
        input_ids=ids,
        segment_ids=seg,
        position_ids=pos,
        videos=VideoRows(pixels, inputs),
        loss_positions=positions,
        loss_targets=targets,
        loss_weights=weights,
        text_rows=text_row_slots(cfg, ids, pos, seg),
    )


def synthetic_batch(
    cfg: ModelConfig,
    rows: int,
    length: int,
    *,
    video_fraction: float = 0.9,
    answer_tokens: int = 64,
    frame_patches: tuple[int, int] = (16, 16),
    pixel_dtype: Any = np.float32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A pipeline-layout batch of random content at an exact row length (for benchmarks and
    tests): each row is text, one video of `video_fraction * length` tokens (frames of
    `frame_patches` patches), text, then `answer_tokens` supervised tokens, then padding.

    Returns the dict `nsa_jax.data.pipeline.collate` returns (with `position_ids`).
    """
    from nsa_jax.data.processor import IGNORE, PAD_ID, rope_index_for

    rng = np.random.default_rng(seed)
    merge = cfg.vision.spatial_merge_size**2
    per_t = frame_patches[0] * frame_patches[1] // merge
    prefix, middle = 8, 8
    text = prefix + 2 + middle + answer_tokens
    t = max(1, min(int(video_fraction * length), length - text) // per_t)
    n_video = t * per_t
    used = text + n_video
    if used > length:
        raise ValueError(f"row of {length} tokens cannot hold {used}")
    vocab = min(cfg.text.vocab_size, cfg.vision_start_token_id)
    rope = rope_index_for(cfg)
    grid = np.asarray([[t, *frame_patches]], np.int32)
    pad = PAD_ID if cfg.text.vocab_size > PAD_ID else 0  # small test vocabularies
    out = {
        "input_ids": np.full((rows, length), pad, np.int32),
        "labels": np.full((rows, length), IGNORE, np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "position_ids": np.zeros((rows, 3, length), np.int32),
        "pixel_values_videos": np.zeros((rows, 4 * length, cfg.vision.patch_dim), pixel_dtype),
        "video_grid_thw": grid[None].repeat(rows, 0),
        "second_per_grid_ts": np.ones((rows, 1), np.float32),
        "video_segment_ids": np.ones((rows, 1), np.int32),
    }
    for r in range(rows):
        ids = np.concatenate([
            rng.integers(0, vocab, prefix), [cfg.vision_start_token_id],
            np.full(n_video, cfg.video_token_id), [cfg.vision_end_token_id],
            rng.integers(0, vocab, middle + answer_tokens),
        ]).astype(np.int32)
        out["input_ids"][r, :used] = ids
        out["labels"][r, used - answer_tokens : used] = ids[-answer_tokens:]
        out["segment_ids"][r, :used] = 1
        out["positions"][r, :used] = np.arange(used)
        out["position_ids"][r, :, :used] = rope(ids, grid, out["second_per_grid_ts"][r])
        out["pixel_values_videos"][r, : n_video * merge] = rng.standard_normal(
            (n_video * merge, cfg.vision.patch_dim)).astype(pixel_dtype)
    return out
