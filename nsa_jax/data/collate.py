"""Rows of samples -> one static-shape batch, padded to the smallest bucket length."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

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


def collate(rows: Sequence[Sequence[dict]], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Rows of samples -> a batch padded to one bucket length `L`.

    Returns (B rows, V = max_videos_per_row, P = 4 * L patch rows):
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
    B, Vmax, P = len(rows), cfg.max_videos_per_row, 4 * L
    dtype = numpy_dtype(cfg.pixel_dtype)
    has_pos = "position_ids" in rows[0][0]
    out = {
        "input_ids": np.full((B, L), PAD_ID, np.int32),
        "labels": np.full((B, L), IGNORE, np.int32),
        "segment_ids": np.zeros((B, L), np.int32),
        "positions": np.zeros((B, L), np.int32),
        "pixel_values_videos": np.zeros((B, P, V.PATCH_DIM), dtype),
        "video_grid_thw": np.zeros((B, Vmax, 3), np.int32),
        "second_per_grid_ts": np.zeros((B, Vmax), np.float32),
        "video_segment_ids": np.zeros((B, Vmax), np.int32),
    }
    if has_pos:
        out["position_ids"] = np.zeros((B, 3, L), np.int32)
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
