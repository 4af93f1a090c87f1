"""Rows of samples -> one static-shape batch, padded to the smallest bucket length."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from nsa_jax.data import video as V
from nsa_jax.data.config import DataConfig, numpy_dtype
from nsa_jax.data.processor import IGNORE, PAD_ID
from pallas_kernels.numerics import round_up


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"row of {n} tokens exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


# A merged video token stands for 2 x 2 patches (Qwen2.5-VL's spatial merge), so a row of `L`
# tokens holds at most 4 L patches: a batch has `P = PATCH_SLOTS * L` patch rows.
PATCH_SLOTS = 4
# What each token array holds on padding (segment 0: attended by nothing, no loss).
TOKEN_FILL = {"input_ids": PAD_ID, "labels": IGNORE, "segment_ids": 0, "positions": 0,
              "position_ids": 0}


def empty_batch(rows: int, length: int, videos: int, *, pixel_dtype: Any = np.float32,
                patch_dim: int = V.PATCH_DIM, position_ids: bool = True,
                pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
    """A batch of `rows` rows of `length` tokens and `videos` video slots holding padding
    only, in `collate`'s layout (`pad_id` for the ids: small test vocabularies lack
    `<|endoftext|>`)."""
    out = {
        "input_ids": np.full((rows, length), pad_id, np.int32),
        "labels": np.full((rows, length), TOKEN_FILL["labels"], np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "pixel_values_videos": np.zeros((rows, PATCH_SLOTS * length, patch_dim), pixel_dtype),
        "video_grid_thw": np.zeros((rows, videos, 3), np.int32),
        "second_per_grid_ts": np.zeros((rows, videos), np.float32),
        "video_segment_ids": np.zeros((rows, videos), np.int32),
    }
    if position_ids:
        out["position_ids"] = np.zeros((rows, 3, length), np.int32)
    return out


def pad_batch(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """`batch` (`collate`'s layout) padded from its bucket length to `length` tokens (and
    `PATCH_SLOTS * length` patch rows) as `collate` pads (`TOKEN_FILL`, zero pixels)."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    out = dict(batch)
    for key, fill in TOKEN_FILL.items():
        if key in batch:
            width = [(0, 0)] * (batch[key].ndim - 1) + [(0, extra)]
            out[key] = np.pad(batch[key], width, constant_values=fill)
    pixels = batch["pixel_values_videos"]
    out["pixel_values_videos"] = np.pad(
        pixels, [(0, 0), (0, PATCH_SLOTS * length - pixels.shape[1]), (0, 0)])
    return out


def collate(rows: Sequence[Sequence[dict]], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Rows of samples -> a batch padded to one bucket length `L`.

    Returns (B rows, V = max_videos_per_row, P = `PATCH_SLOTS` * L patch rows):
      input_ids int32 [B, L] (pad `<|endoftext|>`), labels int32 [B, L] (`IGNORE` on pad),
      segment_ids int32 [B, L] (1, 2, ... per sample, 0 = padding),
      positions int32 [B, L] (index within its sample; 0 on padding),
      position_ids int32 [B, 3, L] (only if the samples carry them; 0 on padding),
      pixel_values_videos [B, P, 1176] (zero rows after the real patches),
      video_grid_thw int32 [B, V, 3] (zero rows for absent videos),
      second_per_grid_ts float32 [B, V], video_segment_ids int32 [B, V] (0 = absent).
    """
    align = cfg.align if cfg.pack else 1
    longest = max(
        sum(round_up(len(s["input_ids"]), align) for s in r[:-1]) + len(r[-1]["input_ids"])
        for r in rows
    )
    L = bucket_length(longest, cfg.bucket_lengths)
    Vmax = cfg.max_videos_per_row
    has_pos = "position_ids" in rows[0][0]
    out = empty_batch(len(rows), L, Vmax, pixel_dtype=numpy_dtype(cfg.pixel_dtype),
                      position_ids=has_pos)
    for b, row in enumerate(rows):
        off = poff = v = 0
        for k, s in enumerate(row):
            n, nv = len(s["input_ids"]), len(s["video_grid_thw"])
            if v + nv > Vmax:
                raise ValueError(
                    f"{s.get('source', 'sample')}: {v + nv} videos in a row but "
                    f"max_videos_per_row={Vmax}; raise it"
                )
            out["input_ids"][b, off : off + n] = s["input_ids"]
            out["labels"][b, off : off + n] = s["labels"]
            out["segment_ids"][b, off : off + n] = k + 1
            out["positions"][b, off : off + n] = np.arange(n)
            if has_pos:
                out["position_ids"][b, :, off : off + n] = s["position_ids"]
            npatch = s["pixel_values_videos"].shape[0]
            out["pixel_values_videos"][b, poff : poff + npatch] = s["pixel_values_videos"]
            out["video_grid_thw"][b, v : v + nv] = s["video_grid_thw"]
            out["second_per_grid_ts"][b, v : v + nv] = s["second_per_grid_ts"]
            out["video_segment_ids"][b, v : v + nv] = k + 1
            off += round_up(n, align)
            poff += npatch
            v += nv
    return out
