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
from nsa_jax.model.vlm import VideoRows
from nsa_jax.train.loss import answer_targets

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
    """

    input_ids: Array | np.ndarray
    segment_ids: Array | np.ndarray
    position_ids: Array | np.ndarray
    videos: VideoRows
    loss_positions: Array | np.ndarray
    loss_targets: Array | np.ndarray
    loss_weights: Array | np.ndarray

    @property
    def answer_tokens(self) -> int:
        """Supervised tokens in the batch (host arrays only)."""
        return int(np.asarray(self.loss_weights).sum())


jax.tree_util.register_dataclass(
    ModelBatch,
    data_fields=["input_ids", "segment_ids", "position_ids", "videos", "loss_positions",
                 "loss_targets", "loss_weights"],
    meta_fields=[],
)


def row_vision_inputs(grids: np.ndarray, slots: int, cfg: ModelConfig) -> VisionInputs:
    """Vision index arrays for one row's videos `grids: [V, 3]` (zero rows = no video) padded
    to `slots` patches: the padding patches follow the real ones in one segment of their own
    (for the window and the full-attention blocks), at position (0, 0), and keep their order,
    so the merged features of the real patches come first."""
    grids = np.asarray(grids).reshape(-1, 3)
    grids = grids[grids[:, 0] > 0]
    unit = cfg.vision.spatial_merge_size**2
    if grids.shape[0]:
        real = VisionInputs.from_grid(grids, cfg.vision)
    else:
        real = VisionInputs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                            np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
    n = real.perm.shape[0]
    if n > slots:
        raise ValueError(f"row has {n} patches but only {slots} patch slots")
    pad = slots - n

    def seg(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, np.full(pad, x.max(initial=-1) + 1)]).astype(np.int32)

    return VisionInputs(
        perm=np.concatenate([real.perm, np.arange(n, slots)]).astype(np.int32),
        inverse=np.concatenate([real.inverse, np.arange(n // unit, slots // unit)]).astype(
            np.int32),
        window_seg=seg(real.window_seg),
        frame_seg=seg(real.frame_seg),
        pos_hw=np.concatenate([real.pos_hw, np.zeros((pad, 2), np.int64)]).astype(np.int32),
    )


def model_batch(batch: dict[str, np.ndarray], cfg: ModelConfig) -> ModelBatch:
    """A pipeline batch (`nsa_jax.data.pipeline.collate`; made with
    `rope_index_fn=rope_index_for(cfg)`) -> the step's `ModelBatch` (NumPy); `K` is the
    `answer_bucket` of the row with the most answer tokens."""
    if "position_ids" not in batch:
        raise ValueError("the batch has no position_ids: build the dataset with "
                         "rope_index_fn=rope_index_for(model_config)")
    pixels = batch["pixel_values_videos"]
    slots = pixels.shape[1]
    rows = [row_vision_inputs(g, slots, cfg) for g in batch["video_grid_thw"]]
    inputs = jax.tree.map(lambda *xs: np.stack(xs), *rows)
    positions, targets, weights = answer_targets(batch["labels"], batch["segment_ids"])
    return ModelBatch(
        input_ids=batch["input_ids"].astype(np.int32),
        segment_ids=batch["segment_ids"].astype(np.int32),
        position_ids=batch["position_ids"].astype(np.int32),
        videos=VideoRows(pixels, inputs),
        loss_positions=positions,
        loss_targets=targets,
        loss_weights=weights,
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
