"""Host-side input preparation: the arguments of `Qwen25VL.forward` from transformers-style
inputs or the data pipeline's batches, in NumPy on the host (no parameters, no Module).

`prepare(cfg, ...)` validates and lays out the inputs, computes the grid-dependent index
arrays (the mRoPE positions, the vision tower's window partition) and the hybrid layers'
static text-row bucket; `forward` is the jit-compiled array function that takes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.attention.compat import check_unpacked, compat_vision_mask
from nsa_jax.attention.hybrid import count_text_rows, text_row_bucket
from nsa_jax.config import ModelConfig
from nsa_jax.model import rope
from nsa_jax.model.vision import VisionInputs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VisualBatch:
    """Pixels of all images (or all videos) of a batch and their host-side index arrays."""

    pixels: Array
    inputs: VisionInputs


jax.tree_util.register_dataclass(VisualBatch, data_fields=["pixels", "inputs"], meta_fields=[])


def prepare(
    cfg: ModelConfig,
    input_ids: Any,
    *,
    attention_mask: Any = None,
    segment_ids: Any = None,
    position_ids: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    pixel_values_videos: Any = None,
    video_grid_thw: Any = None,
    second_per_grid_ts: Any = None,
    mm_token_type_ids: Any = None,
) -> dict[str, Any]:
    """Host-side preparation: the arguments of `Qwen25VL.forward` for a model of config `cfg`
    from transformers-style inputs or from a batch of the data pipeline (`nsa_jax.data`),
    whichever layout comes:

    - `segment_ids [B, T]` (packed samples, 0 = padding) wins over `attention_mask`
      (`[B, T]`, 0 = padding, one sample per row); both absent, or a mask of ones, means
      one sample per row without padding (`segment_ids=None` for `forward`);
    - `position_ids` `[B, 3, T]` are used as given, else computed (per packed sample);
    - pixels `[N, D]` with grids `[V, 3]` (transformers), or per row `[B, P, D]` with
      grids `[B, V, 3]` whose all-zero rows are absent videos (the pipeline's collate).

    `mm_token_type_ids` (0 text, 1 image, 2 video; transformers 5's processor returns it)
    carries nothing `input_ids` does not: the placeholder ids decide, and a disagreement on
    a real (unmasked) token is an error rather than a silent choice between the two.
    """
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    if segment_ids is not None:
        seg = np.asarray(segment_ids).astype(np.int32)
        if seg.shape != ids.shape:
            raise ValueError(f"segment_ids has shape {seg.shape}, input_ids {ids.shape}")
    elif attention_mask is not None:
        seg = (np.asarray(attention_mask) > 0).astype(np.int32)
    else:
        seg = np.ones_like(ids)
    live = seg > 0
    if mm_token_type_ids is not None:
        given = np.asarray(mm_token_type_ids)
        want = rope.token_types(ids, cfg.image_token_id, cfg.video_token_id)
        if given.shape != ids.shape:
            raise ValueError(
                f"mm_token_type_ids has shape {given.shape}, input_ids {ids.shape}"
            )
        bad = (given != want) & live
        if bad.any():
            b, t = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(
                f"mm_token_type_ids disagrees with input_ids at [{b}, {t}]: type "
                f"{int(given[b, t])} for token {int(ids[b, t])} (expected {int(want[b, t])})"
            )
    pixels = {"image": pixel_values, "video": pixel_values_videos}
    grids = {"image": image_grid_thw, "video": video_grid_thw}
    seconds = second_per_grid_ts
    for name in ("image", "video"):
        pixels[name], grids[name], secs = flat_visual(pixels[name], grids[name], seconds)
        if name == "video":
            seconds = secs
    if position_ids is None:
        pos, _ = rope.get_rope_index(
            ids,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
            tokens_per_second=cfg.vision.tokens_per_second,
            image_grid_thw=grids["image"],
            video_grid_thw=grids["video"],
            second_per_grid_ts=seconds,
            attention_mask=None if attention_mask is None and segment_ids is None else live,
            segment_ids=segment_ids if segment_ids is None else seg,
            style=cfg.rope_index_style,
        )
        position_ids = np.moveaxis(pos, 0, 1)  # [B, 3, T]
    position_ids = np.asarray(position_ids).astype(np.int32)
    if position_ids.shape != (ids.shape[0], 3, ids.shape[1]):
        raise ValueError(f"position_ids must be [B, 3, T], got shape {position_ids.shape}")
    tokens = {"image": cfg.image_token_id, "video": cfg.video_token_id}

    def visual(name: str) -> VisualBatch | None:
        if pixels[name] is None:
            return None
        grid = grids[name]
        if grid is None:
            raise ValueError(f"{name} pixels given without their grid_thw")
        n_tokens = int((ids == tokens[name]).sum())
        n_feats = int(grid.prod(-1).sum()) // cfg.vision.spatial_merge_size**2
        if n_tokens != n_feats:
            raise ValueError(
                f"{name} features and {name} tokens do not match: tokens {n_tokens}, "
                f"features {n_feats}"
            )
        vi = VisionInputs.from_grid(grid, cfg.vision)
        return VisualBatch(jnp.asarray(np.asarray(pixels[name])), jax.tree.map(jnp.asarray, vi))

    one_sample = bool(live.all()) and (segment_ids is None or bool((seg == 1).all()))
    return dict(
        input_ids=jnp.asarray(ids),
        position_ids=jnp.asarray(position_ids),
        segment_ids=None if one_sample else jnp.asarray(seg),
        images=visual("image"),
        videos=visual("video"),
        text_rows=text_row_slots(cfg, ids, position_ids, seg),
    )

def prepare_batch(cfg: ModelConfig, batch: dict[str, Any]) -> dict[str, Any]:
    """`forward`'s arguments from a batch of the data pipeline (`nsa_jax.data`) as it
    comes: `model.forward(**prepare_batch(model.cfg, batch))`. Keys the model does not read
    (labels, per-sample positions, video segment ids) stay for the loss."""
    return prepare(
        cfg,
        batch["input_ids"],
        segment_ids=batch.get("segment_ids"),
        position_ids=batch.get("position_ids"),
        pixel_values_videos=batch.get("pixel_values_videos"),
        video_grid_thw=batch.get("video_grid_thw"),
        second_per_grid_ts=batch.get("second_per_grid_ts"),
    )


def text_row_slots(
    cfg: ModelConfig, input_ids: np.ndarray, position_ids: np.ndarray, segment_ids: np.ndarray
) -> int | None:
    """`forward`'s static `text_rows` for a batch (host NumPy `[B, T]` ids and segment ids,
    `[B, 3, T]` positions): the bucketed count of the rows the hybrid layers attend densely
    (text by token id; in the VideoNSA emulation, by position as its code does), or None
    without NSA. Refuses packing where the emulation cannot keep samples apart."""
    if cfg.nsa is None:
        return None
    live = segment_ids > 0
    if cfg.nsa.videonsa_compat:
        is_text = ~compat_vision_mask(np.moveaxis(position_ids, 1, 0)) & live
        check_unpacked(segment_ids, cfg.attention.lse_layout)
    else:
        is_text = (input_ids != cfg.video_token_id) & live
    return text_row_bucket(count_text_rows(is_text), input_ids.shape[1])


def flat_visual(
    pixels: Any, grid: Any, seconds: Any
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Pixels `[N, D]`, grids `[V, 3]` and seconds `[V]` from either layout: already flat, or
    per row (`[B, P, D]`, `[B, V, 3]` with all-zero rows for absent videos, `[B, V]`), whose
    real patches (the first `sum(prod(grid))` of each row) are concatenated in row order."""
    if grid is None:
        return (None if pixels is None else np.asarray(pixels)), None, seconds
    g = np.asarray(grid).astype(np.int64)
    secs = None if seconds is None else np.asarray(seconds, np.float32)
    if g.ndim == 2:
        return (None if pixels is None else np.asarray(pixels)), g, secs
    present = g.prod(-1) > 0  # [B, V]
    flat = None
    if pixels is not None:
        px = np.asarray(pixels)
        flat = np.concatenate([px[b, : int(g[b].prod(-1).sum())] for b in range(g.shape[0])])
    return flat, g[present], None if secs is None else secs[present]
