"""Video input pipeline: decoding, Qwen2.5-VL processor parity, grain datasets.

Public API: `load_video`, `video_to_patches`, `Video`; see docs/data.md.
"""

from nsa_jax.data.video import (
    Video,
    VideoInfo,
    load_video,
    num_video_tokens,
    probe_video,
    smart_nframes,
    smart_resize,
    video_to_patches,
)

__all__ = [
    "Video",
    "VideoInfo",
    "load_video",
    "num_video_tokens",
    "probe_video",
    "smart_nframes",
    "smart_resize",
    "video_to_patches",
]
