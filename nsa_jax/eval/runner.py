"""Runs a task's samples through a model callable and writes the scores.

`run_eval(task, samples, predict, out_dir)` asks `predict(video, prompt, max_new_tokens)` for
each sample's response, scores it, and writes
  `out_dir/predictions.jsonl`  one line per sample as it is answered (id, response, parsed,
                               score), or the error of a video that failed;
  `out_dir/results.json`       task, overall score, per-category scores and counts, the counts
                               of samples, scored, failed and unparsed answers, failed videos,
                               notes and settings;
and prints a table. A video that cannot be read (`predict` raises `VideoError`) is reported,
counted and left out of the scores; any other error stops the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from nsa_jax.eval.tasks import Sample, Scored, Task

# (video path, prompt, max_new_tokens) -> the model's response text
Predict = Callable[[str, str, int], str]


class VideoError(Exception):
    """A video that could not be opened or decoded; the runner counts it and goes on."""


def format_seconds(s: float) -> str:
    s = int(round(s))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A progress line with elapsed time and ETA: redrawn in place on a terminal, otherwise a
    new line at the first and last step and at most every `every_s` seconds."""

    def __init__(self, total: int, label: str, stream: TextIO, every_s: float = 10.0) -> None:
        self.total, self.label, self.stream, self.every_s = total, label, stream, every_s
        self.start = time.monotonic()
        self.last_print = -float("inf")
        self.tty = stream.isatty()

    def line(self, done: int, failed: int) -> str:
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        width = 24
        filled = width * done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        pct = 100 * done / max(self.total, 1)
        tail = f", {failed} failed" if failed else ""
        return (
            f"{self.label} [{bar}] {done}/{self.total} {pct:3.0f}% "
            f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}{tail}"
        )

    def update(self, done: int, failed: int) -> None:
        now = time.monotonic()
        if self.tty:
            end = "\n" if done == self.total else ""
            self.stream.write("\r" + self.line(done, failed) + end)
        elif done in (1, self.total) or now - self.last_print >= self.every_s:
            self.stream.write(self.line(done, failed) + "\n")
            self.last_print = now
        self.stream.flush()


def format_table(results: dict[str, Any]) -> str:
    """The terminal table of a `results.json` dict."""
    c = results["counts"]
    lines = [
        f"{results['task']}: {results['overall']:.2f}  ({c['scored']} scored, {c['failed']} "
        f"failed videos, {c['unparsed']} unparsed answers)",
    ]
    cats = results["categories"]
    if cats:
        width = max(len("category"), *(len(k) for k in cats))
        lines.append(f"  {'category':<{width}}  {'score':>7}  {'count':>6}")
        for name, v in cats.items():
            lines.append(f"  {name:<{width}}  {v['score']:7.2f}  {v['count']:6d}")
    if results["notes"]:
        lines.append(f"  note: {results['notes']}")
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON through a temporary file renamed into place."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_eval(
    task: Task,
    samples: list[Sample],
    predict: Predict,
    out_dir: str | os.PathLike,
    *,
    settings: dict[str, Any] | None = None,
    progress: TextIO | None = None,
    table: TextIO | None = None,
) -> dict[str, Any]:
    """Answers and scores every sample; returns (and writes) the `results.json` dict.

    Args:
      task: the benchmark (`tasks.get_task`).
      samples: its samples (`tasks.load_samples`).
      predict: `(video path, prompt, max_new_tokens) -> response`; raises `VideoError` for a
        video it cannot read.
      out_dir: created if absent; gets `predictions.jsonl` and `results.json`.
      settings: recorded under "settings" (model, sampling, decoding options).
      progress, table: where the progress line and the final table go (default: the standard
        error and output streams).
    """
    progress = sys.stderr if progress is None else progress
    table = sys.stdout if table is None else table
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    bar = Progress(len(samples), f"[{task.name}]", progress)
    scored: list[Scored] = []
    failed: list[dict[str, str]] = []
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as log:
        for i, sample in enumerate(samples):
            try:
                response = predict(sample.video, sample.prompt, sample.max_new_tokens)
            except VideoError as e:
                failed.append({"id": sample.id, "video": sample.video, "error": str(e)})
                progress.write(f"\nfailed video {sample.video} (sample {sample.id}): {e}\n")
                log.write(json.dumps(failed[-1]) + "\n")
            else:
                s = task.score(sample, response)
                scored.append(s)
                log.write(
                    json.dumps(
                        {
                            "id": sample.id,
                            "video": sample.video,
                            "response": response,
                            "answer": sample.answer,
                            **dataclasses.asdict(s),
                        }
                    )
                    + "\n"
                )
            log.flush()
            bar.update(i + 1, len(failed))
    scores = task.aggregate(scored)
    results = {
        "task": task.name,
        "overall": scores.overall,
        "categories": {k: {"score": v, "count": n} for k, (v, n) in scores.categories.items()},
        "counts": {
            "samples": len(samples),
            "scored": len(scored),
            "failed": len(failed),
            "unparsed": sum(not s.parse_ok for s in scored),
        },
        "failed_videos": failed,
        "notes": task.notes,
        "settings": settings or {},
    }
    write_json(os.path.join(out_dir, "results.json"), results)
    table.write(format_table(results) + "\n")
    return results
