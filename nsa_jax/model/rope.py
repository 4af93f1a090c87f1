"""Rotary position embeddings of Qwen2.5-VL.

- Language model: multimodal RoPE. Each token has three positions (temporal, height, width);
  the `head_dim / 2` rotary frequencies are split by `mrope_section` and section `i` takes its
  angle from position `i % 3`.
- `get_rope_index`: those three positions for text, image and video tokens, computed on the
  host in NumPy (it depends on the grids, which fix shapes anyway) exactly as transformers does.
- Vision tower: 2D RoPE (height and width halves of the rotary frequencies); the window
  partition its attention blocks use lives with the tower, in `vision.py`.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

TEXT, IMAGE, VIDEO = 0, 1, 2


# --------------------------------------------------------------------------- language model


def mrope_cos_sin(
    position_ids: Array, head_dim: int, theta: float, mrope_section: tuple[int, ...]
) -> tuple[Array, Array]:
    """cos, sin `[B, T, head_dim]` f32 for 3D positions `position_ids: [3, B, T]`."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, D/2]
    bounds = np.cumsum((0, *mrope_section))
    # section i of the frequency axis reads the angle of position axis i % 3
    freq = jnp.concatenate(
        [freqs[i % 3, ..., bounds[i] : bounds[i + 1]] for i in range(len(mrope_section))], -1
    )
    emb = jnp.concatenate([freq, freq], -1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], -1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates `x: [B, T, H, D]` (or `[N, H, D]`) by cos/sin `[B, T, D]` (`[N, D]`).

    Computed in f32 and cast back to `x.dtype`.
    """
    c, s = cos[..., None, :], sin[..., None, :]
    xf = x.astype(jnp.float32)
    return (xf * c + rotate_half(xf) * s).astype(x.dtype)


def token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """`[B, T]` modality per token: 0 text, 1 image, 2 video (transformers' mm_token_type_ids)."""
    ids = np.asarray(input_ids)
    return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT))


def _vision_positions(
    start: int, grid_thw: np.ndarray, merge: int, time_interval: float | np.floating | int
) -> np.ndarray:
    """`[3, t*h*w/merge^2]` positions of one image/video starting at `start`."""
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // merge, w // merge
    if isinstance(time_interval, (int, np.integer)):
        tpos = np.arange(t, dtype=np.int64) * int(time_interval)
    else:
        # transformers multiplies in float32 and truncates (`.long()`)
        tpos = np.trunc(np.arange(t, dtype=np.float32) * np.float32(time_interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(tpos, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    pos = np.stack([tt, hh, ww]).reshape(3, -1)
    pos[0] += start
    return pos


def get_rope_index(
    input_ids: np.ndarray,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    segment_ids: np.ndarray | None = None,
    style: str = "transformers",
) -> tuple[np.ndarray, np.ndarray]:
    """3D positions `[3, B, T]` int64 and rope deltas `[B, 1]`, as transformers computes them.

    Without any grid every axis is `arange(T)` (transformers ignores the mask there too).
    Otherwise, per row (over unmasked tokens only; masked tokens get position 0): text runs
    count up on all three axes; each image/video takes the next grid: temporal
    `start + trunc(t * interval)` (interval `tokens_per_second * second_per_grid_ts[v]` for
    videos, 1 for images), height `start + y`, width `start + x` on the merged grid. The text
    after it starts at `start + max(h, w) / merge` ("transformers", the installed version) or at
    1 + the largest position of the block ("qwen", the original Qwen2.5-VL code, which also
    counts the temporal axis).

    `segment_ids: [B, T]` (packed samples, 0 = padding): each segment counts from 0 as if it
    were alone (and padding is masked); grids are taken in token order across segments.
    """
    ids = np.asarray(input_ids)
    b, t = ids.shape
    seg = None if segment_ids is None else np.asarray(segment_ids)
    if image_grid_thw is None and video_grid_thw is None:
        if seg is None:
            pos = np.broadcast_to(np.arange(t, dtype=np.int64), (3, b, t)).copy()
            return pos, np.zeros((b, 1), np.int64)
        start = np.maximum.accumulate(
            np.where(np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], 1),
                     np.arange(t), 0), axis=1)
        pos = np.where(seg > 0, np.arange(t) - start, 0).astype(np.int64)
        return np.broadcast_to(pos, (3, b, t)).copy(), np.zeros((b, 1), np.int64)
    types = token_types(ids, image_token_id, video_token_id)
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask) > 0
    if seg is not None:
        mask &= seg > 0
    grids = {
        IMAGE: iter(np.asarray(image_grid_thw)) if image_grid_thw is not None else iter(()),
        VIDEO: iter(np.asarray(video_grid_thw)) if video_grid_thw is not None else iter(()),
    }
    if second_per_grid_ts is not None:
        seconds = iter(np.asarray(second_per_grid_ts, np.float32).reshape(-1))
    else:
        seconds = itertools.repeat(1)
    pos = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    for row in range(b):
        row_types = types[row][mask[row]]
        row_seg = (np.zeros_like(row_types) if seg is None else seg[row][mask[row]]).tolist()
        chunks: list[np.ndarray] = []
        cur = 0
        runs = itertools.groupby(zip(row_seg, row_types.tolist(), strict=True))
        previous = None
        for (segment, modality), group in runs:
            n = len(list(group))
            if segment != previous:  # a packed sample's positions start from 0
                cur, previous = 0, segment
            if modality == TEXT:
                chunks.append(np.broadcast_to(np.arange(n, dtype=np.int64) + cur, (3, n)))
                cur += n
                continue
            done = 0
            while done < n:  # a run of placeholders may hold several images/videos
                grid = next(grids[modality])
                interval: float | np.floating | int = 1
                if modality == VIDEO:
                    sec = next(seconds)
                    if isinstance(sec, (int, np.integer)) and float(tokens_per_second).is_integer():
                        interval = int(tokens_per_second) * int(sec)
                    else:  # transformers multiplies in float32 tensors
                        interval = np.float32(tokens_per_second) * np.float32(sec)
                block = _vision_positions(cur, grid, spatial_merge_size, interval)
                chunks.append(block)
                done += block.shape[1]
                if style == "qwen":
                    cur = int(block.max()) + 1
                else:
                    cur += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        row_pos = np.concatenate(chunks, 1) if chunks else np.zeros((3, 0), np.int64)
        if row_pos.shape[1] != mask[row].sum():
            raise ValueError(
                f"row {row}: {mask[row].sum()} tokens but the grids cover {row_pos.shape[1]}; "
                "image/video placeholder counts do not match image_grid_thw/video_grid_thw"
            )
        pos[:, row, mask[row]] = row_pos
        deltas[row, 0] = (row_pos.max() + 1 if row_pos.size else 0) - mask[row].sum()
    return pos, deltas


# --------------------------------------------------------------------------- vision tower


def vision_position_ids(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """`[N, 2]` (row, column) of each patch, patches ordered merge-block-major as the processor
    emits them (each `merge x merge` block contiguous), repeated over frames."""
    out = []
    for t, h, w in np.asarray(grid_thw).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hh = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        ww = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hh, ww], -1), (t, 1)))
    return np.concatenate(out, 0)


def vision_cos_sin(pos_hw: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """2D RoPE cos/sin `[N, head_dim]` f32 from `[N, 2]` (row, column) positions."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, D/4]
    hw = jnp.concatenate([freqs[:, 0], freqs[:, 1]], -1)
    emb = jnp.concatenate([hw, hw], -1)
    return jnp.cos(emb), jnp.sin(emb)
