"""Per-sample preparation (decode workers) and the main-process grain iterators.

`Prepare` runs in the decode workers: probe, plan frames within the token budget, decode,
patchify, tokenize. A sample that cannot be used (`SKIPPABLE`: a missing, unreadable or corrupt
video, a clip that does not fit the budget, more videos than a row holds) becomes a `Skipped`
record; any other exception is a bug and raises. In the main process `CountSkipped` logs,
counts and drops those (and stops with `NoUsableSamples` when a whole pass over the data gave
nothing), and `Rows` groups samples into rows (one per row, or packed). Both iterators keep
their counts and position in the grain state.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import threading
from typing import Any

import av
import grain
import tokenizers

from nsa_jax.data import video as V
from nsa_jax.data.annotations import resolve_video
from nsa_jax.data.config import DataConfig, numpy_dtype
from nsa_jax.data.processor import RopeIndexFn, encode_chat, process_sample
from pallas_kernels.numerics import round_up

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Per-sample preparation (runs in decode workers)
# ----------------------------------------------------------------------------------------------


class OverBudget(ValueError):
    """The text alone, or the text with 2 frames of each video, exceeds `max_tokens`."""


class TooManyVideos(ValueError):
    """A sample has more videos than `max_videos_per_row`."""


class NoUsableSamples(ValueError):
    """A whole pass over the data was skipped: nothing to train on."""


# What skips a sample rather than stopping the run: the file (OSError: missing, unreadable),
# the container or codec (FFmpeg), the stream (VideoError: no frames, truncated, a clip outside
# the video), the budget. Anything else is a bug and raises.
SKIPPABLE: tuple[type[Exception], ...] = (OSError, av.FFmpegError, V.VideoError, OverBudget,
                                           TooManyVideos)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A sample that could not be prepared; counted and dropped in the main process."""

    source: str
    path: str
    reason: str


def plan_frames(
    info: V.VideoInfo, budget: int, cfg: DataConfig, start: float | None, end: float | None
) -> tuple[int, tuple[int, int]]:
    """Frame count and size for one video within `budget` video tokens.

    Starts from Qwen's fps rule; while the clip costs more tokens than `budget`, samples fewer
    frames (uniformly over the whole clip: the clip is covered more sparsely, not cut short).

    Raises:
      OverBudget: not even 2 frames fit.
    """
    lo, hi = V.frame_range(info, start, end)
    n = V.smart_nframes(hi - lo + 1, info.fps, fps=cfg.fps, min_frames=cfg.min_frames,
                        max_frames=cfg.max_frames)

    def cost(n: int) -> tuple[int, tuple[int, int]]:
        h, w = V.resized_size(info.height, info.width, n, min_pixels=cfg.min_pixels,
                              max_pixels=cfg.max_pixels, total_pixels=cfg.total_pixels)
        return V.num_video_tokens(V.video_grid(n, h, w)), (h, w)

    tokens, size = cost(n)
    while tokens > budget:
        if n <= V.TEMPORAL_PATCH_SIZE:
            raise OverBudget(
                f"video needs {tokens} tokens for 2 frames but only {budget} are left after "
                "the text; raise max_tokens or lower max_pixels"
            )
        # Jump close to the answer, then step: fewer frames may enlarge frames (total_pixels).
        guess = math.floor(n * budget / tokens / 2) * 2
        n = max(V.TEMPORAL_PATCH_SIZE, min(n - 2, guess))
        tokens, size = cost(n)
    return n, size


class VideoCache:
    """Decoded clips by what decides them (file, its size and mtime, the clip's range and the
    token budget it was planned for), least recently used out past `max_bytes`.

    A file rewritten in place changes its size or mtime, so it is decoded again. grain's
    read-ahead threads share it, hence the lock; a decode worker process receives it pickled,
    and starts empty (each process keeps its own clips).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self._clips: collections.OrderedDict[tuple, V.Video] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])

    @staticmethod
    def key(path: str, start: float | None, end: float | None, budget: int) -> tuple:
        st = os.stat(path)
        return path, st.st_size, st.st_mtime_ns, start, end, budget

    def get(self, key: tuple) -> V.Video | None:
        with self._lock:
            clip = self._clips.get(key)
            if clip is not None:
                self._clips.move_to_end(key)
                self.hits += 1
            return clip

    def put(self, key: tuple, clip: V.Video) -> None:
        size = clip.frames.nbytes
        clip.frames.flags.writeable = False  # shared by every later read of the clip
        with self._lock:
            if size > self.max_bytes or key in self._clips:
                return
            while self.bytes + size > self.max_bytes:
                self.bytes -= self._clips.popitem(last=False)[1].frames.nbytes
            self._clips[key] = clip
            self.bytes += size


@dataclasses.dataclass
class Prepare:
    """Record -> model inputs (see `processor.process_sample`) or `Skipped`."""

    tokenizer: tokenizers.Tokenizer
    cfg: DataConfig
    rope_index_fn: RopeIndexFn | None = None

    def __post_init__(self) -> None:
        self.cache = VideoCache(self.cfg.video_cache_mb << 20) if self.cfg.video_cache_mb \
            else None

    def _load(self, path: str, budget: int, rec: dict) -> V.Video:
        """One video of `rec`, planned within `budget` tokens (from the cache when kept)."""
        start, end = rec.get("video_start"), rec.get("video_end")
        if self.cache is None:
            return self._decode(path, budget, start, end)
        key = VideoCache.key(path, start, end, budget)
        clip = self.cache.get(key)
        if clip is None:
            clip = self._decode(path, budget, start, end)
            self.cache.put(key, clip)
        return clip

    def _decode(self, path: str, budget: int, start: float | None,
                end: float | None) -> V.Video:
        info = V.probe_video(path)
        n, _ = plan_frames(info, budget, self.cfg, start, end)
        return V.load_video(path, num_frames=n, min_pixels=self.cfg.min_pixels,
                            max_pixels=self.cfg.max_pixels, total_pixels=self.cfg.total_pixels,
                            start=start, end=end, info=info)

    def __call__(self, rec: dict) -> dict | Skipped:
        paths = [resolve_video(p, self.cfg.video_roots) for p in rec["videos"]]
        current = paths[0] if paths else ""
        try:
            if len(paths) > self.cfg.max_videos_per_row:
                raise TooManyVideos(f"{len(paths)} videos but max_videos_per_row="
                                    f"{self.cfg.max_videos_per_row}")
            # Text cost first: the text is kept whole, the videos share what is left.
            text = encode_chat(self.tokenizer, rec["messages"], [0] * len(paths),
                               system=self.cfg.system)
            left = self.cfg.max_tokens - len(text)
            if left <= 0:
                raise OverBudget(f"text alone is {len(text)} tokens > max_tokens "
                                 f"({self.cfg.max_tokens})")
            videos = []
            for p in paths:
                current = p
                videos.append(self._load(p, left // len(paths), rec))
            out = process_sample(self.tokenizer, rec["messages"], videos, system=self.cfg.system,
                                 rope_index_fn=self.rope_index_fn,
                                 pixel_dtype=numpy_dtype(self.cfg.pixel_dtype))
        except SKIPPABLE as e:
            return Skipped(rec.get("source", "?"), current, f"{type(e).__name__}: {e}")
        out["source"] = rec.get("source", "?")
        return out


# ----------------------------------------------------------------------------------------------
# Main-process iterators: skip accounting and row building (checkpointable)
# ----------------------------------------------------------------------------------------------


class CountSkipped(grain.IterDataset):
    """Drops `Skipped` records, counting them by cause and logging each file and reason once
    (a file skipped again in a later epoch is counted, not logged again).

    `pass_size` samples skipped in a row (a whole pass over this host's records) end the
    iteration with `NoUsableSamples`, naming the first failures, instead of looping for ever
    over a dataset that yields nothing; so does data that ends with no sample at all.
    """

    def __init__(self, parent: grain.IterDataset, pass_size: int):
        super().__init__(parent)
        self._pass_size = pass_size

    def __iter__(self) -> CountSkippedIterator:
        return CountSkippedIterator(self._parent.__iter__(), self._pass_size)


class CountSkippedIterator(grain.DatasetIterator):
    """`CountSkipped`'s iterator; `stats` are the counts so far (see `pipeline_stats`)."""

    FIRST_FAILURES = 3

    def __init__(self, parent: grain.DatasetIterator, pass_size: int):
        super().__init__(parent)
        self.pass_size = max(1, pass_size)
        self.samples = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.in_row = 0
        self.first_failures: list[str] = []
        # what was logged, kept apart from the iterator state: a resumed run logs it again once
        self.logged: set[tuple[str, str]] = set()

    def _no_usable_samples(self, why: str) -> NoUsableSamples:
        return NoUsableSamples(
            f"{why}: every sample failed; first failures: " + "; ".join(self.first_failures)
        )

    def __next__(self) -> dict:
        while True:
            try:
                x = next(self._parent)
            except StopIteration:
                if self.samples == 0 and self.skipped:
                    raise self._no_usable_samples(
                        f"the data ended after {sum(self.skipped.values())} samples") from None
                raise
            if isinstance(x, Skipped):
                kind = x.reason.split(":", 1)[0]
                self.skipped[kind] += 1
                self.in_row += 1
                if (x.path, x.reason) not in self.logged:
                    self.logged.add((x.path, x.reason))
                    log.warning("skipping %s (%s): %s", x.path, x.source, x.reason)
                if len(self.first_failures) < self.FIRST_FAILURES:
                    self.first_failures.append(f"{x.path} ({x.source}): {x.reason}")
                if self.in_row >= self.pass_size:
                    raise self._no_usable_samples(f"{self.in_row} samples in a row were skipped "
                                                  f"(all {self.pass_size} of a pass)")
                continue
            self.samples += 1
            self.in_row = 0
            return x

    @property
    def stats(self) -> dict[str, Any]:
        return {"samples": self.samples, "skipped": sum(self.skipped.values()),
                "skipped_by_reason": dict(self.skipped)}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "samples": self.samples,
                "skipped": dict(self.skipped), "in_row": self.in_row,
                "first_failures": list(self.first_failures)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.samples = int(state["samples"])
        self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
        self.in_row = int(state["in_row"])
        self.first_failures = list(state["first_failures"])


class Rows(grain.IterDataset):
    """Groups samples into rows: one per row, or greedily packed (in arrival order).

    A packed sample starts at a multiple of `align` (64, the NSA block): with segment ids, its
    blocks then line up exactly as if it were alone, so sparse attention over the packed row
    equals attention over the sample by itself.
    """

    def __init__(self, parent: grain.IterDataset, cfg: DataConfig):
        super().__init__(parent)
        self._cfg = cfg

    def __iter__(self) -> _RowsIterator:
        return _RowsIterator(self._parent.__iter__(), self._cfg)


class _RowsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig):
        super().__init__(parent)
        self._cfg = cfg
        self._pending: dict | None = None  # pulled but not yet placed in a row
        self._state_before_pending: dict | None = None

    def _pull(self) -> dict:
        if self._pending is not None:
            x, self._pending, self._state_before_pending = self._pending, None, None
            return x
        return next(self._parent)

    def __next__(self) -> list[dict]:
        cfg = self._cfg
        first = self._pull()
        if not cfg.pack:
            return [first]
        row, used, nvid = [first], round_up(len(first["input_ids"]), cfg.align), \
            len(first["video_grid_thw"])
        while True:
            before = self._parent.get_state()
            try:
                x = next(self._parent)
            except StopIteration:
                break
            need = round_up(len(x["input_ids"]), cfg.align)
            if used + need > cfg.max_tokens or nvid + len(x["video_grid_thw"]) > \
                    cfg.max_videos_per_row:
                self._pending, self._state_before_pending = x, before
                break
            row.append(x)
            used += need
            nvid += len(x["video_grid_thw"])
        return row

    def get_state(self) -> dict[str, Any]:
        # A pending sample is re-read after a restore: resume from just before it was pulled.
        if self._pending is not None:
            return {"parent": self._state_before_pending}
        return {"parent": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._state_before_pending = None
