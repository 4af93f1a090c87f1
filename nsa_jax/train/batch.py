"""From the grain pipeline's batches (host NumPy, see docs/data.md) to the step's arrays.

`model_batch` adds what the model needs besides the pipeline's arrays: each row's vision index
arrays (`VisionInputs`, computed on the host from the grids and padded to the row's `P` patch
slots) and the answer-token targets of the loss (`loss.answer_targets`). Every array keeps the
batch as its leading axis, so the whole batch shards over (`data`, `fsdp`). With several hosts,
`host_batches` pads each host's micro-batches to the shapes all of them agree on. The
pipeline batch's own layout (keys, padding, patch slots) is `nsa_jax.data.collate`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from nsa_jax.config import ModelConfig
from nsa_jax.data.collate import empty_batch, pad_batch
from nsa_jax.model.inputs import text_row_slots
from nsa_jax.model.vision import SegmentLayout, VisionInputs
from nsa_jax.model.vlm import VideoRows
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
      text_rows: the hybrid layers' static text-row slots (`inputs.text_row_slots`), or None.
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


# ------------------------------------------------------------------ several hosts: one shape


def pad_answers(batch: ModelBatch, slots: int) -> ModelBatch:
    """`batch` with `slots` answer slots a row (the added ones empty: weight 0)."""
    extra = slots - batch.loss_positions.shape[1]
    if extra <= 0:
        return batch

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(np.asarray(x), [(0, 0), (0, extra)])

    return dataclasses.replace(batch, loss_positions=pad(batch.loss_positions),
                               loss_targets=pad(batch.loss_targets),
                               loss_weights=pad(batch.loss_weights))


def pad_layout(layout: SegmentLayout, rows: int, longest: int) -> SegmentLayout:
    """A batch of vision `SegmentLayout`s (`gather [B, S, L]`, `scatter [B, P]`, `lengths
    [B, S]`, as `VisionInputs.padded` lays them out) widened to `[B, rows, longest]`: each
    row's layout padded again (`SegmentLayout.padded`) into its same `P` slots."""
    gather, scatter, lengths = (np.asarray(x) for x in (layout.gather, layout.scatter,
                                                          layout.lengths))
    if gather.shape[1:] == (rows, longest):
        return layout
    wide = [SegmentLayout(g, s, n).padded(s.size, rows, longest)
            for g, s, n in zip(gather, scatter, lengths, strict=True)]
    return jax.tree.map(lambda *xs: np.stack(xs), *wide)


def _signature(batch: ModelBatch) -> list[int]:
    """The shapes of a micro-batch that each host picks for itself: row length, answer
    slots, text-row slots (-1: none), and the vision windows' and frames' layout shapes."""
    v = batch.videos.inputs
    return [batch.input_ids.shape[1], batch.loss_positions.shape[1],
            -1 if batch.text_rows is None else batch.text_rows,
            *np.shape(v.window.gather)[1:], *np.shape(v.frame.gather)[1:]]


def host_batches(raws: list[dict[str, np.ndarray]], cfg: ModelConfig) -> list[ModelBatch]:
    """The step's micro-batches of this process, with the shapes every process agrees on.

    A global array is assembled from every process's rows, so the i-th micro-batch must have
    the same shapes (and static `text_rows`) on every host, although each host's pipeline and
    `model_batch` pick bucket length, answer slots, text-row slots and vision layouts for its
    own rows. The hosts exchange theirs (two small all-gathers a step) and pad to the largest:
    padded tokens are segment 0, padded answer slots weigh 0, padded text-row slots and vision
    segments are empty, so the loss and the gradients are those of the unpadded rows.
    """
    if jax.process_count() == 1:
        return [model_batch(raw, cfg) for raw in raws]
    from jax.experimental import multihost_utils

    def agree(local: list[list[int]]) -> list[list[int]]:
        every = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return np.asarray(every).max(axis=0).tolist()

    # the row length first: the rest of the layout follows from it
    lengths = agree([[raw["input_ids"].shape[1]] for raw in raws])
    batches = [model_batch(pad_batch(raw, length), cfg)
               for raw, (length,) in zip(raws, lengths, strict=True)]
    out = []
    for batch, sig in zip(batches, agree([_signature(b)[1:] for b in batches]), strict=True):
        slots, text_rows, win_rows, win_len, frame_rows, frame_len = sig
        v = batch.videos.inputs
        inputs = dataclasses.replace(v, window=pad_layout(v.window, win_rows, win_len),
                                     frame=pad_layout(v.frame, frame_rows, frame_len))
        out.append(dataclasses.replace(
            pad_answers(batch, slots), videos=dataclasses.replace(batch.videos, inputs=inputs),
            text_rows=None if text_rows < 0 else text_rows))
    return out


# ------------------------------------------------------------------ benchmarks and tests


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
    from nsa_jax.data.processor import PAD_ID, rope_index_for

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
    out = empty_batch(rows, length, 1, pixel_dtype=pixel_dtype, patch_dim=cfg.vision.patch_dim,
                      pad_id=pad)
    out["video_grid_thw"][:] = grid
    out["second_per_grid_ts"][:] = 1.0
    out["video_segment_ids"][:] = 1
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
