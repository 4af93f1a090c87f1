"""Video decoding, Qwen2.5-VL frame sampling and resizing, and patchify.

Decoding uses PyAV. A video is first *probed* by demuxing its packets (no decoding): that gives
the exact frame count and every frame's presentation time, also for variable frame rate and for
containers whose header carries no frame count (WebM, some AVI). Frames are then chosen exactly as
`qwen-vl-utils` chooses them (`smart_nframes`, then `linspace(start, end, n).round()` over frame
indices) and decoded with keyframe seeks, so a long video is not decoded end to end when only a
few hundred frames are wanted.

Sizes follow Qwen's `smart_resize`: both sides multiples of 28 (patch 14 x merge 2), pixels per
frame within `[min_pixels, max_pixels]`, and `max_pixels` lowered so that the whole clip stays
within `total_pixels` (qwen-vl-utils' rule), which is what keeps a video within a 128K context.

`video_to_patches` produces the layout of transformers' `Qwen2VLVideoProcessor` (used by
Qwen2.5-VL): rows ordered (t, h-block, w-block, h-in-block, w-in-block) so that each 2x2 group
the merger fuses is contiguous; each row is (channel, temporal, patch_y, patch_x) flattened.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import av
import numpy as np

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: the side of one merged (language) token in pixels
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176

# OpenAI CLIP normalisation, as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# qwen-vl-utils defaults for video.
VIDEO_MIN_PIXELS = 128 * FACTOR * FACTOR
VIDEO_MAX_PIXELS = 768 * FACTOR * FACTOR
VIDEO_TOTAL_PIXELS = int(128000 * FACTOR * FACTOR * 0.9)
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class Video:
    """Sampled, resized frames of one video.

    Attributes:
      frames: uint8 `[T, H, W, 3]` RGB, `H` and `W` multiples of 28, `T` even.
      timestamps: float64 `[T]`, seconds from the start of the video stream.
      fps: the source's average frame rate (frames / duration of the decoded range).
      sample_fps: Qwen's effective sampling rate `T / total_frames * fps`; the processor's
        `second_per_grid_ts` is `2 / sample_fps`.
      path: where it came from.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    fps: float
    sample_fps: float
    path: str = ""

    @property
    def second_per_grid(self) -> float:
        """Seconds covered by one temporal patch (Qwen2.5-VL's `second_per_grid_ts`)."""
        return TEMPORAL_PATCH_SIZE / self.sample_fps


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a probe learns without decoding.

    Attributes:
      pts: int64 `[N]` presentation times of all frames, sorted, in `time_base` units.
      keyframe_pts: int64 `[K]` presentation times of keyframes, sorted.
      time_base: seconds per pts unit.
      start_pts: the stream's start time in pts units (timestamps are measured from it).
      width, height: displayed size (after rotation metadata).
      rotation: counter-clockwise degrees to rotate decoded frames by (0, 90, 180, 270).
      codec: decoder name.
    """

    pts: np.ndarray
    keyframe_pts: np.ndarray
    time_base: float
    start_pts: int
    width: int
    height: int
    rotation: int
    codec: str

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last (last frame lasts one mean gap)."""
        if self.num_frames < 2:
            return 0.0
        span = float(self.pts[-1] - self.pts[0]) * self.time_base
        return span * self.num_frames / (self.num_frames - 1)

    @property
    def fps(self) -> float:
        """Average frame rate over the whole stream (as decord's `get_avg_fps`)."""
        d = self.duration
        return self.num_frames / d if d > 0 else 1.0

    def seconds(self, pts: np.ndarray) -> np.ndarray:
        return (np.asarray(pts, np.float64) - self.start_pts) * self.time_base


# ----------------------------------------------------------------------------------------------
# Sizes and frame counts (pure functions of numbers, matching qwen-vl-utils)
# ----------------------------------------------------------------------------------------------


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = FACTOR,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen's resize rule: sides multiples of `factor`, pixels in `[min_pixels, max_pixels]`.

    The aspect ratio is kept as closely as the rounding allows. Same arithmetic as
    qwen-vl-utils' and transformers' `smart_resize` (qwen-vl-utils' form, which also keeps
    each side at least `factor`).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"smart_resize: height and width must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"smart_resize: aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}; "
            "crop the video first"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_pixel_cap(
    num_frames: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> int:
    """Per-frame pixel cap given the clip's total budget (qwen-vl-utils' `fetch_video`).

    Each temporal patch (2 frames) gets an even share of `total_pixels`, but never less than
    `1.05 * min_pixels`, and never more than `max_pixels`.
    """
    share = max(
        min(VIDEO_MAX_PIXELS, total_pixels / num_frames * TEMPORAL_PATCH_SIZE),
        int(min_pixels * 1.05),
    )
    return int(min(max_pixels, share))


def resized_size(
    height: int,
    width: int,
    num_frames: int,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
) -> tuple[int, int]:
    """The `(H, W)` a clip of `num_frames` frames of `height x width` is resized to."""
    cap = frame_pixel_cap(
        num_frames, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels
    )
    return smart_resize(height, width, min_pixels=min_pixels, max_pixels=cap)


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> int:
    """How many frames Qwen samples (qwen-vl-utils' `smart_nframes`); always even.

    With `num_frames`, that count rounded to a multiple of 2. Otherwise `duration * fps`
    clamped to `[ceil2(min_frames), floor2(min(max_frames, total_frames))]` and to the
    frames available, floored to a multiple of 2.
    """
    f = TEMPORAL_PATCH_SIZE
    if num_frames is not None:
        n = round(num_frames / f) * f
    else:
        if fps is None or fps <= 0:
            raise ValueError(f"frames a second must be positive, got {fps}")
        lo = math.ceil(min_frames / f) * f
        hi = math.floor(min(max_frames, total_frames) / f) * f
        n = total_frames / video_fps * fps
        n = min(min(max(n, lo), hi), total_frames)
        n = math.floor(n / f) * f
    if total_frames < f:
        raise ValueError(f"cannot sample a clip of {total_frames} frame(s): at least {f} needed")
    if not f <= n <= total_frames:
        raise ValueError(
            f"cannot sample {n} frames from a clip of {total_frames} frames: ask for "
            f"{f} to {total_frames}"
        )
    return int(n)


def sample_indices(start: int, end: int, n: int) -> np.ndarray:
    """Qwen's frame choice: `linspace(start, end, n).round()`, int64 `[n]` (end inclusive).

    `np.round` rounds half to even like `torch.round`, so the indices match qwen-vl-utils.
    """
    return np.round(np.linspace(start, end, n)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Probing and decoding
# ----------------------------------------------------------------------------------------------


class VideoError(ValueError):
    """A video file (or the clip an annotation asks for) that cannot be used: no video stream,
    no frames, frames that do not decode, a time range outside the video. The pipeline skips
    the sample; a `ValueError` of another kind is a bug and raises."""


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Demuxes all packets of the first video stream (no decoding except one frame).

    Raises:
      FileNotFoundError: the file does not exist.
      VideoError: the file has no video stream or no frames.
      av.FFmpegError: the container cannot be read.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        time_base = float(stream.time_base) if stream.time_base else 1.0 / 90000
        pts, keys = [], []
        for packet in container.demux(stream):
            if packet.size == 0:  # flush packet at the end of demuxing
                continue
            t = packet.pts if packet.pts is not None else packet.dts
            if t is None:
                continue
            pts.append(t)
            if packet.is_keyframe:
                keys.append(t)
        if not pts:
            raise VideoError(f"{path}: the video stream has no frames")
        # One decoded frame gives the true size and the display rotation (side data).
        container.seek(0, stream=stream)
        first = next(container.decode(stream), None)
        if first is None:
            raise VideoError(f"{path}: no frame could be decoded")
        rotation = int(round((first.rotation or 0) / 90.0)) % 4 * 90
        width, height = first.width, first.height
        codec = stream.codec_context.name
        start = stream.start_time if stream.start_time is not None else min(pts)
    if rotation in (90, 270):
        width, height = height, width
    pts_arr = np.unique(np.asarray(pts, np.int64))  # sorted; B-frames arrive out of order
    keys_arr = np.unique(np.asarray(keys, np.int64))
    if keys_arr.size == 0 or keys_arr[0] > pts_arr[0]:
        keys_arr = np.concatenate([pts_arr[:1], keys_arr])
    return VideoInfo(
        pts=pts_arr,
        keyframe_pts=keys_arr,
        time_base=time_base,
        start_pts=int(start),
        width=int(width),
        height=int(height),
        rotation=rotation,
        codec=codec,
    )


def frame_range(info: VideoInfo, start: float | None, end: float | None) -> tuple[int, int]:
    """Inclusive frame-index range `[first, last]` of the frames with `start <= t <= end`."""
    secs = info.seconds(info.pts)
    lo = 0 if start is None else int(np.searchsorted(secs, start - 1e-9, side="left"))
    hi = info.num_frames - 1 if end is None else int(np.searchsorted(secs, end + 1e-9, "right")) - 1
    if lo > hi or lo >= info.num_frames or hi < 0:
        raise VideoError(
            f"time range [{start}, {end}] s selects no frames of a {secs[-1]:.2f} s video; "
            "check video_start/video_end"
        )
    return lo, hi


def decode_frames(
    path: str | os.PathLike,
    info: VideoInfo,
    indices: Sequence[int] | np.ndarray,
    size: tuple[int, int],
) -> np.ndarray:
    """Decodes frames `indices` (into `info.pts`) resized to `size = (H, W)`: uint8 `[n, H, W, 3]`.

    Seeks to the keyframe before a wanted frame whenever that keyframe lies ahead of the
    decoder's position, so sparse sampling of a long video decodes only what it needs.
    Resizing is swscale's bicubic (area-aware when shrinking) done with the RGB conversion.
    """
    path = os.fspath(path)
    indices = np.asarray(indices, np.int64)
    want = info.pts[indices]
    order = np.unique(want)  # decode in time order; duplicates decode once
    out_h, out_w = size
    # Rotation by 90/270 swaps sides: resize to the pre-rotation size, then rotate.
    dec_w, dec_h = (out_h, out_w) if info.rotation in (90, 270) else (out_w, out_h)
    got: dict[int, np.ndarray] = {}
    keys = info.keyframe_pts
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        pos: int | None = None  # pts of the last decoded frame; None before the first seek
        i = 0
        while i < order.size:
            target = int(order[i])
            key = int(keys[np.searchsorted(keys, target, "right") - 1])
            if pos is None or key > pos:
                container.seek(key, stream=stream, backward=True, any_frame=False)
            exhausted = True
            for frame in container.decode(stream):
                t = frame.pts if frame.pts is not None else frame.dts
                if t is None:
                    continue
                pos = t
                # Wanted frames the decoder stepped over (dropped as corrupt) stay missing.
                while i < order.size and order[i] < t:
                    i += 1
                if i < order.size and order[i] == t:
                    got[t] = _to_rgb(frame, dec_w, dec_h, info.rotation)
                    i += 1
                if i >= order.size:
                    exhausted = False
                    break
                # A keyframe between here and the next wanted frame: seeking there skips work.
                if int(keys[np.searchsorted(keys, int(order[i]), "right") - 1]) > t:
                    exhausted = False
                    break
            if exhausted:
                break  # end of stream
    missing = [int(p) for p in order if int(p) not in got]
    if missing:
        raise VideoError(
            f"{path}: could not decode {len(missing)} of {order.size} sampled frames "
            f"(first missing pts {missing[0]}); the file is truncated or corrupt"
        )
    return np.stack([got[int(p)] for p in want])


def _to_rgb(frame: av.VideoFrame, width: int, height: int, rotation: int) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
    if rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return rgb


@dataclasses.dataclass(frozen=True)
class VideoPlan:
    """Which frames of a video Qwen samples and at what size, known from a probe alone.

    Attributes:
      path: the file.
      info: its probe.
      indices: int64 `[n]` sampled frame indices into `info.pts`, `n` even.
      size: `(H, W)` the frames are resized to, multiples of 28.
      fps: the source's average frame rate.
      sample_fps: Qwen's effective sampling rate `n / total_frames * fps`.
    """

    path: str
    info: VideoInfo
    indices: np.ndarray
    size: tuple[int, int]
    fps: float
    sample_fps: float

    @property
    def grid(self) -> np.ndarray:
        """int64 `[1, 3]`: the `video_grid_thw` of these frames."""
        return np.asarray([video_grid(self.indices.size, *self.size)], np.int64)

    @property
    def timestamps(self) -> np.ndarray:
        return self.info.seconds(self.info.pts[self.indices])

    @property
    def second_per_grid(self) -> float:
        """Seconds covered by one temporal patch (Qwen2.5-VL's `second_per_grid_ts`)."""
        return TEMPORAL_PATCH_SIZE / self.sample_fps

    def decode(self) -> Video:
        """Every sampled frame, decoded."""
        frames = decode_frames(self.path, self.info, self.indices, self.size)
        return Video(frames, self.timestamps, self.fps, self.sample_fps, self.path)


def plan_video(
    path: str | os.PathLike,
    *,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    start: float | None = None,
    end: float | None = None,
    info: VideoInfo | None = None,
) -> VideoPlan:
    """The frames and size Qwen2.5-VL's reference pipeline (qwen-vl-utils) samples, from a probe
    (no decoding). Arguments as `load_video`'s."""
    if num_frames is not None and num_frames < TEMPORAL_PATCH_SIZE:
        raise ValueError(f"num_frames must be >= {TEMPORAL_PATCH_SIZE}, got {num_frames}")
    info = info if info is not None else probe_video(path)
    lo, hi = frame_range(info, start, end)
    total = hi - lo + 1
    span_fps = info.fps  # qwen-vl-utils keeps the stream's average fps for a sub-range
    n = smart_nframes(
        total, span_fps, fps=None if num_frames is not None else fps, num_frames=num_frames,
        min_frames=min_frames, max_frames=max_frames,
    )
    size = resized_size(
        info.height, info.width, n,
        min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels,
    )
    return VideoPlan(os.fspath(path), info, sample_indices(lo, hi, n), size, span_fps,
                     n / max(total, 1e-6) * span_fps)


def load_video(
    path: str | os.PathLike,
    *,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    total_pixels: int = VIDEO_TOTAL_PIXELS,
    start: float | None = None,
    end: float | None = None,
    info: VideoInfo | None = None,
) -> Video:
    """Decodes a video the way Qwen2.5-VL's reference pipeline (qwen-vl-utils) samples it.

    Args:
      path: any container/codec FFmpeg reads (MP4/H.264, WebM/VP9, AVI/MJPEG, MPEG-4, ...).
      fps: target sampling rate; ignored when `num_frames` is given.
      num_frames: exact frame count (rounded to a multiple of 2).
      min_frames, max_frames: clamp for fps sampling.
      min_pixels, max_pixels: per-frame pixel range for `smart_resize`.
      total_pixels: pixel budget over the whole clip (lowers the per-frame cap).
      start, end: optional time range in seconds (inclusive).
      info: a probe result to reuse (the pipeline probes first to plan its token budget).

    Returns:
      `Video` with frames uint8 `[T, H, W, 3]`, `T` even, `H, W` multiples of 28.
    """
    return plan_video(
        path, fps=fps, num_frames=num_frames, min_frames=min_frames, max_frames=max_frames,
        min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels, start=start,
        end=end, info=info,
    ).decode()


class VideoPatches:
    """A planned video's `pixel_values_videos` `[N, 1176]`, decoded on demand: `patches[a:b]`
    (rows of whole temporal patches) decodes only those frames, seeking to the keyframe before
    the first, and patchifies them. The model's prefill reads it a chunk at a time, so an hour
    of video is never held whole, neither as frames nor as patches.

    Decoding failures (truncated or corrupt files) raise `VideoError`."""

    def __init__(self, plan: VideoPlan) -> None:
        self.plan = plan
        t, h, w = plan.grid[0].tolist()
        self.rows_per_patch = h * w
        self.shape = (t * h * w, PATCH_DIM)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        per = self.rows_per_patch
        if step != 1 or start % per or (stop % per and stop != self.shape[0]):
            raise ValueError(
                f"VideoPatches: rows {start}:{stop}:{step} are not whole temporal patches of "
                f"{per} rows; slice at multiples of {per}"
            )
        f = TEMPORAL_PATCH_SIZE
        indices = self.plan.indices[start // per * f : -(-stop // per) * f]
        try:
            frames = decode_frames(self.plan.path, self.plan.info, indices, self.plan.size)
        except av.FFmpegError as e:
            raise VideoError(f"{self.plan.path}: {type(e).__name__}: {e}") from e
        return video_to_patches(frames)[0]


# ----------------------------------------------------------------------------------------------
# Patchify
# ----------------------------------------------------------------------------------------------


def video_grid(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """`(t, h, w)` patch grid of a clip (frames padded to even by repeating the last)."""
    if height % FACTOR or width % FACTOR:
        raise ValueError(
            f"frame size {height}x{width} is not a multiple of {FACTOR}; resize with smart_resize"
        )
    t = -(-num_frames // TEMPORAL_PATCH_SIZE)
    return t, height // PATCH_SIZE, width // PATCH_SIZE


def num_video_tokens(grid_thw: Sequence[int]) -> int:
    """Language tokens (`<|video_pad|>`) for a grid: `t * h * w / merge**2`."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (MERGE_SIZE * MERGE_SIZE)


def video_to_patches(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL `pixel_values_videos` and `video_grid_thw` for one clip.

    Args:
      frames: uint8 (or float in [0, 255]) `[T, H, W, 3]` RGB, `H, W` multiples of 28.

    Returns:
      pixel_values: float32 `[t*h*w, 1176]`, CLIP-normalised; rows in the order
        (t, h/2, w/2, 2, 2) and each row (channel 3, temporal 2, 14, 14) flattened.
      grid_thw: int64 `[1, 3]` = `(t, h, w)` with `t = ceil(T/2)`, `h = H/14`, `w = W/14`.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video_to_patches expects frames [T, H, W, 3], got shape {frames.shape}")
    n, height, width, _ = frames.shape
    if n == 0:
        raise ValueError("video_to_patches: no frames")
    gt, gh, gw = video_grid(n, height, width)
    if pad := -n % TEMPORAL_PATCH_SIZE:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    # transformers fuses rescale (1/255) into mean/std: (x - 255*mean) / (255*std), float32.
    mean = np.asarray(CLIP_MEAN, np.float32) * np.float32(255.0)
    std = np.asarray(CLIP_STD, np.float32) * np.float32(255.0)
    x = (frames.astype(np.float32) - mean) / std
    m, p, tp = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, 3)
    # -> (gt, gh/m, gw/m, m_h, m_w, C, tp, p_y, p_x)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    pixel_values = np.ascontiguousarray(x.reshape(gt * gh * gw, PATCH_DIM))
    return pixel_values, np.asarray([[gt, gh, gw]], np.int64)


def patches_to_video(pixel_values: np.ndarray, grid_thw: Sequence[int]) -> np.ndarray:
    """Inverse of `video_to_patches` (without de-normalising): float32 `[2t, H, W, 3]`."""
    gt, gh, gw = (int(v) for v in grid_thw)
    m, p, tp = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    x = np.asarray(pixel_values).reshape(gt, gh // m, gw // m, m, m, 3, tp, p, p)
    x = x.transpose(0, 6, 1, 3, 7, 2, 4, 8, 5)
    return x.reshape(gt * tp, gh * p, gw * p, 3)
