"""Procedurally generated long videos with known answers, written with PyAV (no downloads).

Three tasks, each written as video files plus one JSONL annotation file in the LLaVA-Video
format (`{"video": ..., "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}`) so
that the real pipeline (`nsa_jax.data.pipeline`) reads them:

- `needle`: a long video of slowly drifting noise in which one colour is flashed briefly
  (`needle_frames` frames) at a random moment; the question asks for the colour.
- `counting`: a square flashes `k` times at random moments; the question asks for `k`.
- `order`: two coloured events happen at different moments; the question asks which came first.

Difficulty is the needle/flash duration in frames (shorter = harder) and the video length.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from fractions import Fraction

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (40, 220, 220),
    "white": (250, 250, 250),
    "orange": (250, 140, 20),
}

# Encoder name -> (container suffix, pixel format) that the `av` wheel can write.
CODECS: dict[str, tuple[str, str]] = {
    "libx264": (".mp4", "yuv420p"),
    "libvpx-vp9": (".webm", "yuv420p"),
    "mjpeg": (".avi", "yuvj420p"),
    "mpeg4": (".mp4", "yuv420p"),
}


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray] | np.ndarray,
    *,
    fps: float = 8.0,
    codec: str = "libx264",
    rotation: int = 0,
    pts_ms: Iterable[int] | None = None,
    crf: int | None = 18,
    pix_fmt: str | None = None,
) -> str:
    """Encodes uint8 RGB frames `[T, H, W, 3]` to a video file.

    Args:
      path: output file; the container is chosen from its suffix.
      frames: any iterable of `[H, W, 3]` uint8 frames (a generator keeps memory flat).
      fps: nominal frame rate (constant-rate timestamps `i / fps` unless `pts_ms` is given).
      codec: an encoder from `CODECS` (or any the wheel has).
      rotation: display-matrix rotation in degrees counter-clockwise (phone videos carry one).
      pts_ms: per-frame presentation times in milliseconds, for variable frame rate.
      crf: quality for libx264 / libvpx-vp9 (lower is better); other encoders get a high
        bit rate instead. None leaves the encoder's default.
      pix_fmt: encoder pixel format; default the codec's entry in `CODECS`.

    Returns:
      the path written.
    """
    path = os.fspath(path)
    pix_fmt = pix_fmt or CODECS.get(codec, ("", "yuv420p"))[1]
    # x264 refuses odd sides with subsampled chroma (the other encoders take them): such
    # frames are padded by one edge pixel. With yuv444p, x264 keeps the odd size.
    pad_even = codec == "libx264" and not pix_fmt.endswith("444p")
    pts_iter = iter(pts_ms) if pts_ms is not None else None
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, "w") as container:
        stream = None
        for i, img in enumerate(frames):
            img = np.asarray(img, np.uint8)
            if stream is None:
                stream = container.add_stream(codec, rate=rate)
                h, w = img.shape[:2]
                stream.width, stream.height = (w + w % 2, h + h % 2) if pad_even else (w, h)
                stream.pix_fmt = pix_fmt
                if pts_iter is not None:
                    stream.codec_context.time_base = Fraction(1, 1000)
                if crf is not None and codec in ("libx264", "libvpx-vp9"):
                    stream.options = {"crf": str(crf)}
                elif crf is not None:
                    # Encoders without CRF (mpeg4) otherwise fall to a few kbit/s, too coarse
                    # for tests that read grey levels back.
                    stream.bit_rate = 8_000_000
                if codec == "libx264":
                    # x264's macroblock-tree rate control (its SIMD path, on some x86 hosts)
                    # gave different pixels from one write of the same frames to the next,
                    # and so one training command different losses; without it every write
                    # is the same (tests/test_data_video.py)
                    stream.options = {**stream.options, "x264-params": "no-mbtree=1"}
                if codec == "libvpx-vp9":
                    stream.options = {**stream.options, "deadline": "realtime", "cpu-used": "8"}
                if rotation:
                    stream.set_display_rotation(rotation)
            if pad_even and (img.shape[0] % 2 or img.shape[1] % 2):
                img = np.pad(img, ((0, img.shape[0] % 2), (0, img.shape[1] % 2), (0, 0)), "edge")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if pts_iter is not None:
                frame.pts = int(next(pts_iter))
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
            container.mux(stream.encode(frame))
        if stream is None:
            raise ValueError(f"write_video({path}): no frames given")
        container.mux(stream.encode())
    return path


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and difficulty of generated videos.

    Attributes:
      num_frames: frames per video (length = num_frames / fps seconds).
      height, width: frame size in pixels.
      fps: frame rate written to the file.
      event_frames: how many consecutive frames an event (needle, flash) lasts; with sampling at
        `s` fps out of `fps`, an event shorter than `fps / s` frames may be missed: harder.
      codec: encoder from `CODECS`.
      event_size: side of an event's square as a fraction of the frame's (centred); 0.5, the
        centre half, by default; 1.0 colours the whole frame (the boldest cue).
      max_count: the counting task's flashes are 1 to `max_count`.
    """

    num_frames: int = 256
    height: int = 112
    width: int = 112
    fps: float = 8.0
    event_frames: int = 4
    codec: str = "libx264"
    event_size: float = 0.5
    max_count: int = 6

    def __post_init__(self) -> None:
        if not 0 < self.event_size <= 1:
            raise ValueError(f"event_size must be in (0, 1], got {self.event_size}")
        if self.max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {self.max_count}")


def _background(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """A dim textured background `[H, W, 3]` so that frames are not trivially compressible."""
    return rng.integers(20, 90, size=(cfg.height, cfg.width, 3), dtype=np.uint8)


def _frames(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    events: list[tuple[int, tuple[int, int, int]]],
) -> Iterable[np.ndarray]:
    """Yields frames with a drifting background and solid-colour squares at `events`.

    `events` holds `(start_frame, rgb)`; each lasts `cfg.event_frames` frames and fills a
    centred square of `cfg.event_size` of the frame's sides.
    """
    bg = _background(rng, cfg)
    h, w = cfg.height, cfg.width
    # floors: the default 0.5 gives [h // 4, 3 * h // 4), the centre half as before the option
    top, bottom = int(h * (1 - cfg.event_size) / 2), int(h * (1 + cfg.event_size) / 2)
    left, right = int(w * (1 - cfg.event_size) / 2), int(w * (1 + cfg.event_size) / 2)
    for i in range(cfg.num_frames):
        img = np.roll(bg, shift=i, axis=1)  # slow horizontal drift
        for start, rgb in events:
            if start <= i < start + cfg.event_frames:
                img = img.copy()
                img[top:bottom, left:right] = rgb
        yield img


def _spaced_starts(rng: np.random.Generator, n: int, cfg: SyntheticConfig) -> list[int]:
    """`n` sorted event starts at least `2 * event_frames` apart, inside the video."""
    gap = 2 * cfg.event_frames
    room = cfg.num_frames - cfg.event_frames - gap * (n - 1)
    if room <= 0:
        raise ValueError(
            f"{n} events of {cfg.event_frames} frames do not fit in {cfg.num_frames} frames; "
            "raise num_frames or lower event_frames"
        )
    base = np.sort(rng.choice(room, size=n, replace=False))
    return [int(b + k * gap) for k, b in enumerate(base)]


def make_needle(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[list, str, str]:
    """Returns (events, question, answer) for the needle task."""
    name = str(rng.choice(list(COLOURS)))
    start = _spaced_starts(rng, 1, cfg)[0]
    q = "A coloured square appears briefly somewhere in this video. What colour is it?"
    return [(start, COLOURS[name])], q, name


def make_counting(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[list, str, str]:
    """Returns (events, question, answer) for the counting task (1 to `cfg.max_count` white
    flashes)."""
    k = int(rng.integers(1, cfg.max_count + 1))
    starts = _spaced_starts(rng, k, cfg)
    q = "How many times does a white square flash in this video? Answer with a number."
    return [(s, COLOURS["white"]) for s in starts], q, str(k)


def make_order(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[list, str, str]:
    """Returns (events, question, answer) for the order task (two distinct colours)."""
    a, b = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    s1, s2 = _spaced_starts(rng, 2, cfg)
    first = a
    q = f"A {a} square and a {b} square each appear once. Which appears first, {a} or {b}?"
    if rng.random() < 0.5:  # shuffle which colour comes first
        first = b
        return [(s1, COLOURS[b]), (s2, COLOURS[a])], q, first
    return [(s1, COLOURS[a]), (s2, COLOURS[b])], q, first


TASKS = {"needle": make_needle, "counting": make_counting, "order": make_order}


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    task: str = "needle",
    num_videos: int = 8,
    cfg: SyntheticConfig = SyntheticConfig(),
    seed: int = 0,
    on_video: Callable[[int], None] | None = None,
) -> str:
    """Writes `num_videos` videos and `<task>.jsonl` (paths relative to `out_dir`).

    `on_video(i)` is called after video `i` is written (a progress bar's hook).

    Returns:
      the annotation file's path; pass `out_dir` as the pipeline's video root.
    """
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = CODECS.get(cfg.codec, (".mp4", ""))[0]
    lines = []
    for i in range(num_videos):
        events, question, answer = TASKS[task](rng, cfg)
        name = f"{task}_{i:05d}{suffix}"
        write_video(os.path.join(out_dir, name), _frames(cfg, rng, events), fps=cfg.fps,
                    codec=cfg.codec)
        lines.append({
            "id": f"{task}_{i:05d}",
            "video": name,
            "conversations": [
                {"from": "human", "value": f"<video>\n{question}"},
                {"from": "gpt", "value": answer},
            ],
            "events": [[s, cfg.event_frames] for s, _ in events],
        })
        if on_video is not None:
            on_video(i)
    ann = os.path.join(out_dir, f"{task}.jsonl")
    with open(ann, "w") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    return ann
