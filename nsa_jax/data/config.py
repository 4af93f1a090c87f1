"""The pipeline's configuration (`DataConfig`) and its presets (`PRESETS`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nsa_jax.data import video as V
from nsa_jax.data.processor import DEFAULT_SYSTEM

NSA_BLOCK = 64  # NSA block length: packed samples start on block boundaries


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the pipeline needs besides the annotations and the tokenizer.

    Attributes:
      fps, min_frames, max_frames: frame sampling (Qwen's `smart_nframes`).
      min_pixels, max_pixels, total_pixels: per-frame and per-clip pixel budgets.
      max_tokens: token budget per sample (text + video); frames are dropped (sampled more
        sparsely) to fit, the text never is. Also the longest row.
      bucket_lengths: static row lengths; a batch is padded to the smallest that fits. The last
        must be >= max_tokens.
      pack: pack several samples per row (segment ids keep them apart).
      align: packed samples start at multiples of this (the NSA block size).
      max_videos_per_row: static size of the per-row video arrays.
      batch_size: rows per batch (per host).
      seed, shuffle: shuffling of each host's slice of the annotations (new order per epoch).
      num_epochs: passes over the data; None repeats forever.
      num_workers: decode worker processes (0 decodes in the main process).
      video_cache_mb: decoded clips kept in memory, per decode process, least recently used
        out (0: none). For a small dataset read for many epochs (the demo: 768 clips of
        ~0.4 MB), every epoch after the first then skips decoding. With `num_workers`
        processes each keeps its own (up to `num_workers x video_cache_mb` in all), and a
        clip may go to another worker next epoch: hits then come once each worker holds
        most of the dataset.
      video_roots: directories tried in order for relative video paths.
      system: default system prompt.
      pixel_dtype: "float32" or "bfloat16" for `pixel_values_videos`.
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = V.VIDEO_MIN_PIXELS
    max_pixels: int = V.VIDEO_MAX_PIXELS
    total_pixels: int = V.VIDEO_TOTAL_PIXELS
    max_tokens: int = 32768
    bucket_lengths: tuple[int, ...] = (4096, 8192, 16384, 32768)
    pack: bool = False
    align: int = NSA_BLOCK
    max_videos_per_row: int = 1
    batch_size: int = 1
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    num_workers: int = 0
    video_cache_mb: int = 0
    video_roots: tuple[str, ...] = ()
    system: str | None = DEFAULT_SYSTEM
    pixel_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.bucket_lengths or max(self.bucket_lengths) < self.max_tokens:
            raise ValueError(
                f"bucket_lengths {self.bucket_lengths} must include a length >= max_tokens "
                f"({self.max_tokens}); add one"
            )
        if list(self.bucket_lengths) != sorted(set(self.bucket_lengths)):
            raise ValueError(f"bucket_lengths {self.bucket_lengths} must be strictly increasing")
        if self.pack and any(b % self.align for b in self.bucket_lengths):
            raise ValueError(
                f"with pack=True bucket_lengths must be multiples of align={self.align}"
            )
        if self.max_videos_per_row < 1 or self.batch_size < 1:
            raise ValueError("max_videos_per_row and batch_size must be >= 1")
        if self.video_cache_mb < 0:
            raise ValueError(f"video_cache_mb must be >= 0, got {self.video_cache_mb}")


# VideoNSA's training recipe (ms-swift script, project page): 4 fps, clips of 350-550 frames,
# at most 50,176 pixels (224 x 224) per frame, 36K tokens per example.
VIDEONSA_36K = DataConfig(
    fps=4.0, min_frames=350, max_frames=550, min_pixels=4 * 28 * 28, max_pixels=50176,
    total_pixels=V.VIDEO_TOTAL_PIXELS, max_tokens=36864,
    bucket_lengths=(4096, 8192, 16384, 24576, 36864),
)
# The 128K evaluation-time context: same per-frame size, up to 4,096 frames (64 tokens per
# temporal patch at 224 x 224 -> 131,072 tokens at most).
VIDEONSA_128K = dataclasses.replace(
    VIDEONSA_36K, min_frames=4, max_frames=4096, max_tokens=131072,
    total_pixels=int(131072 * 28 * 28 * 0.9),
    bucket_lengths=(8192, 16384, 32768, 65536, 98304, 131072),
)
PRESETS: dict[str, DataConfig] = {
    "default": DataConfig(),
    "videonsa-36k": VIDEONSA_36K,
    "videonsa-128k": VIDEONSA_128K,
}


def numpy_dtype(name: str) -> Any:
    """`DataConfig.pixel_dtype` ("float32", "bfloat16", ...) -> a NumPy dtype."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)
