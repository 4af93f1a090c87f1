"""Runs a task's samples through a model callable and writes the scores.

`run_eval(task, samples, predict, out_dir)` asks `predict(video, prompt, max_new_tokens)` for
each sample's response, scores it, and writes
  `out_dir/predictions.jsonl`  one line per sample as it is answered (id, response, parsed,
                               score), or the error of a video that failed;
  `out_dir/results.json`       task, overall score, per-category scores and counts, the counts
                               of samples, scored, failed and unparsed answers, failed videos,
                               notes and settings;
and prints a table. A video that cannot be read (`predict` raises `VideoError`) is reported
above the progress bar, counted and left out of the scores; any other error stops the run. A
run that scores no sample has `"overall": null`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from nsa_jax.eval.tasks import Sample, Scored, Task

# (video path, prompt, max_new_tokens) -> the model's response text
Predict = Callable[[str, str, int], str]


class VideoError(Exception):
    """A video that could not be opened or decoded; the runner counts it and goes on."""


def format_table(results: dict[str, Any]) -> str:
    """The terminal table of a `results.json` dict."""
    c = results["counts"]
    score = "nothing scored" if results["overall"] is None else f"{results['overall']:.2f}"
    lines = [
        f"{results['task']}: {score}  ({c['scored']} scored, {c['failed']} failed videos, "
        f"{c['unparsed']} unparsed answers)",
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
      progress, table: where the progress bar (tqdm) and the final table go (default: the standard
        error and output streams).
    """
    progress = sys.stderr if progress is None else progress
    table = sys.stdout if table is None else table
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    scored: list[Scored] = []
    failed: list[dict[str, str]] = []
    bar = tqdm(total=len(samples), desc=task.name, unit="sample", file=progress, dynamic_ncols=True)
    with bar, open(os.path.join(out_dir, "predictions.jsonl"), "w") as log:
        for sample in samples:
            try:
                response = predict(sample.video, sample.prompt, sample.max_new_tokens)
            except VideoError as e:
                failed.append({"id": sample.id, "video": sample.video, "error": str(e)})
                # above the bar, which is redrawn below it
                bar.write(f"failed video {sample.video} (sample {sample.id}): {e}", file=progress)
                bar.set_postfix(failed=len(failed))
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
            bar.update(1)
    scores = task.aggregate(scored)
    results = {
        "task": task.name,
        # a run that scored nothing has no score (not 0: every video may have failed)
        "overall": scores.overall if scored else None,
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
