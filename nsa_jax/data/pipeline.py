"""grain datasets over LLaVA-Video / ms-swift annotations: decode, tokenize, budget, pack, batch.

Graph (host side, NumPy):

    read_annotations  (fail fast on a malformed line: file and line in the error)
      -> MapDataset.source -> shuffle(seed) -> shard (ShardByJaxProcess) -> repeat
      -> map(Prepare): probe video, plan frames within the token budget, decode, patchify,
                       tokenize; a bad video becomes a `Skipped` record instead of an error
      -> to_iter_dataset -> mp_prefetch (decode worker processes)
      -> CountSkipped   (main process: log path + reason, count, drop; counts in the state)
      -> Rows           (one sample per row, or greedy packing aligned to 64-token blocks)
      -> batch(collate) (pad to the smallest bucket length: a few static shapes for jit)

Every stage is a grain iterator, so `iterator.get_state()` / `set_state()` (and orbax via
`grain.checkpoint.CheckpointSave/Restore`) resume exactly where a run stopped.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tokenizers

from nsa_jax.data import video as V
from nsa_jax.data.processor import (
    DEFAULT_SYSTEM,
    IGNORE,
    PAD_ID,
    RopeIndexFn,
    count_video_placeholders,
    encode_chat,
    process_sample,
)

log = logging.getLogger(__name__)

NSA_BLOCK = 64  # NSA block length: packed samples start on block boundaries


# ----------------------------------------------------------------------------------------------
# Configuration and presets
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


def normalize_record(rec: Any) -> dict[str, Any]:
    """LLaVA-Video or ms-swift record -> `{"videos": [...], "messages": [...], ...}`.

    Accepted shapes:
      LLaVA-Video: `{"video": p, "conversations": [{"from": "human"|"gpt", "value": s}, ...]}`
      ms-swift:    `{"messages": [{"role": r, "content": s}, ...], "videos": [p, ...]}`
    Optional `video_start` / `video_end` (seconds) select a clip.

    Raises:
      ValueError naming the problem (the caller adds file and line).
    """
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list):
            raise ValueError('"conversations" must be a list')
        messages = []
        for t in turns:
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise ValueError('each conversation turn needs "from" and "value"')
            if t["from"] not in _LLAVA_ROLES:
                raise ValueError(f"unknown speaker {t['from']!r}; use human/gpt/system")
            messages.append({"role": _LLAVA_ROLES[t["from"]], "content": t["value"]})
    elif "messages" in rec:
        turns = rec["messages"]
        if not isinstance(turns, list):
            raise ValueError('"messages" must be a list')
        messages = []
        for t in turns:
            if not isinstance(t, dict) or "role" not in t or "content" not in t:
                raise ValueError('each message needs "role" and "content"')
            if t["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {t['role']!r}; use system/user/assistant")
            messages.append({"role": t["role"], "content": t["content"]})
    else:
        raise ValueError('no "conversations" (LLaVA-Video) or "messages" (ms-swift) field')
    if not all(isinstance(m["content"], str) for m in messages):
        raise ValueError("message contents must be strings")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ValueError("no non-empty assistant answer to train on")
    videos = rec.get("videos", rec.get("video", []))
    videos = [videos] if isinstance(videos, str) else videos
    if not isinstance(videos, list) or not all(isinstance(v, str) for v in videos):
        raise ValueError('"video"/"videos" must be a path or a list of paths')
    n_ph = count_video_placeholders(messages)
    if n_ph not in (0, len(videos)):
        raise ValueError(f"{n_ph} <video> placeholders for {len(videos)} videos")
    out = {"videos": videos, "messages": messages}
    for k in ("video_start", "video_end"):
        if rec.get(k) is not None:
            out[k] = float(rec[k])
    return out


def _json_array_records(text: str) -> list[tuple[int, Any]]:
    """Parses a JSON array, returning (line number, element) for each element."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise json.JSONDecodeError("unterminated array", text, i)
        if text[i] == "]":
            return out
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise json.JSONDecodeError(e.msg, text, e.pos) from None
        out.append((line, obj))


def read_annotations(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """Reads JSON (an array) or JSONL annotation files into normalized records.

    Each record gets `"source": "file:line"` for error messages. A malformed line fails fast
    with a ValueError naming its file and line.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records: list[dict] = []
    for path in paths:
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            try:
                items = _json_array_records(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        else:
            items = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        for lineno, obj in items:
            try:
                rec = normalize_record(obj)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed annotation: {e}") from None
            rec["source"] = f"{path}:{lineno}"
            records.append(rec)
    return records


def resolve_video(path: str, roots: Sequence[str]) -> str:
    """Absolute paths as they are; relative ones under the first root where the file exists."""
    if os.path.isabs(path) or not roots:
        return path
    for root in roots:
        cand = os.path.join(root, path)
        if os.path.exists(cand):
            return cand
    return os.path.join(roots[0], path)


# ----------------------------------------------------------------------------------------------
# Per-sample preparation (runs in decode workers)
# ----------------------------------------------------------------------------------------------


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
      ValueError: not even 2 frames fit.
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
            raise ValueError(
                f"video needs {tokens} tokens for 2 frames but only {budget} are left after "
                "the text; raise max_tokens or lower max_pixels"
            )
        # Jump close to the answer, then step: fewer frames may enlarge frames (total_pixels).
        guess = math.floor(n * budget / tokens / 2) * 2
        n = max(V.TEMPORAL_PATCH_SIZE, min(n - 2, guess))
        tokens, size = cost(n)
    return n, size


@dataclasses.dataclass
class Prepare:
    """Record -> model inputs (see `processor.process_sample`) or `Skipped`."""

    tokenizer: tokenizers.Tokenizer
    cfg: DataConfig
    rope_index_fn: RopeIndexFn | None = None

    def __call__(self, rec: dict) -> dict | Skipped:
        paths = [resolve_video(p, self.cfg.video_roots) for p in rec["videos"]]
        current = paths[0] if paths else ""
        try:
            # Text cost first: the text is kept whole, the videos share what is left.
            text = encode_chat(self.tokenizer, rec["messages"], [0] * len(paths),
                               system=self.cfg.system)
            left = self.cfg.max_tokens - len(text)
            if left <= 0:
                raise ValueError(f"text alone is {len(text)} tokens > max_tokens")
            videos = []
            for p in paths:
                current = p
                info = V.probe_video(p)
                n, _ = plan_frames(info, left // len(paths), self.cfg, rec.get("video_start"),
                                   rec.get("video_end"))
                videos.append(V.load_video(
                    p, num_frames=n, min_pixels=self.cfg.min_pixels,
                    max_pixels=self.cfg.max_pixels, total_pixels=self.cfg.total_pixels,
                    start=rec.get("video_start"), end=rec.get("video_end"), info=info,
                ))
            out = process_sample(self.tokenizer, rec["messages"], videos, system=self.cfg.system,
                                 rope_index_fn=self.rope_index_fn,
                                 pixel_dtype=_dtype(self.cfg.pixel_dtype))
        except Exception as e:  # noqa: BLE001 - any decode failure skips the sample
            return Skipped(rec.get("source", "?"), current, f"{type(e).__name__}: {e}")
        out["source"] = rec.get("source", "?")
        return out


def _dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


# ----------------------------------------------------------------------------------------------
# Main-process iterators: skip accounting and row building (checkpointable)
# ----------------------------------------------------------------------------------------------


class CountSkipped(grain.IterDataset):
    """Drops `Skipped` records, logging each with its path and reason and counting them."""

    def __iter__(self) -> _CountSkippedIterator:
        return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.samples = 0
        self.skipped: collections.Counter[str] = collections.Counter()

    def __next__(self) -> dict:
        while True:
            x = next(self._parent)
            if isinstance(x, Skipped):
                kind = x.reason.split(":", 1)[0]
                self.skipped[kind] += 1
                log.warning("skipping %s (%s): %s", x.path, x.source, x.reason)
                continue
            self.samples += 1
            return x

    @property
    def stats(self) -> dict[str, Any]:
        return {"samples": self.samples, "skipped": sum(self.skipped.values()),
                "skipped_by_reason": dict(self.skipped)}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "samples": self.samples,
                "skipped": dict(self.skipped)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self.samples = int(state["samples"])
        self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})


def _aligned(n: int, align: int) -> int:
    return -(-n // align) * align


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
        row, used, nvid = [first], _aligned(len(first["input_ids"]), cfg.align), \
            len(first["video_grid_thw"])
        while True:
            before = self._parent.get_state()
            try:
                x = next(self._parent)
            except StopIteration:
                break
            need = _aligned(len(x["input_ids"]), cfg.align)
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


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------


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
        sum(_aligned(len(s["input_ids"]), align) for s in r[:-1]) + len(r[-1]["input_ids"])
        for r in rows
    )
    L = bucket_length(longest, cfg.bucket_lengths)
    B, Vmax, P = len(rows), cfg.max_videos_per_row, 4 * L
    dtype = _dtype(cfg.pixel_dtype)
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
            off += _aligned(n, align)
            poff += npatch
            v += nv
    return out


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


def make_dataset(
    annotations: str | os.PathLike | Sequence[str | os.PathLike] | list[dict],
    tokenizer: tokenizers.Tokenizer,
    cfg: DataConfig = DataConfig(),
    *,
    shard: grain.sharding.ShardOptions | None = None,
    rope_index_fn: RopeIndexFn | None = None,
) -> grain.IterDataset:
    """The training input pipeline as a grain `IterDataset` of batches (see `collate`).

    Args:
      annotations: annotation file path(s), or records already read with `read_annotations`.
      tokenizer: a Qwen2.5-VL tokenizer (`tokenizer.load_tokenizer`).
      cfg: a `DataConfig` (or a preset from `PRESETS`).
      shard: which slice this host reads; default `ShardByJaxProcess()` (one slice per JAX
        process, equal sizes).
      rope_index_fn: adds `position_ids`: `processor.rope_index_for(model_cfg)` for the model.

    `iter(ds)` gives a checkpointable iterator; `pipeline_stats(iterator)` reports the samples
    read and the videos skipped.
    """
    if isinstance(annotations, list) and (not annotations or isinstance(annotations[0], dict)):
        records = annotations
    else:
        records = read_annotations(annotations)
    if not records:
        raise ValueError("make_dataset: no annotation records")
    shard = shard if shard is not None else grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = grain.MapDataset.source(records)
    end = len(ds) - len(ds) % shard.shard_count if shard.drop_remainder else len(ds)
    ds = ds[shard.shard_index : end : shard.shard_count]  # disjoint, equal slices per host
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    # repeat() reseeds the shuffle above for each epoch: a fresh order every pass.
    ds = ds.repeat(cfg.num_epochs) if cfg.num_epochs != 1 else ds
    ds = ds.map(Prepare(tokenizer, cfg, rope_index_fn))
    it = ds.to_iter_dataset()
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    it = CountSkipped(it)
    it = Rows(it, cfg)
    return it.batch(cfg.batch_size, batch_fn=lambda rows: collate(rows, cfg))


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which only `absl.app.run` parses; our CLI and
    pytest are not absl programs, so the defaults are taken as parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pipeline_stats(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """Samples read and videos skipped (by reason) so far, from the iterator tree."""
    todo = [iterator]
    while todo:
        it = todo.pop()
        if isinstance(it, _CountSkippedIterator):
            return it.stats
        todo.extend(getattr(it, "_parents", ()))
    raise ValueError("pipeline_stats: not an iterator of make_dataset()")
