"""`nsa-jax demo`: VideoNSA and its dense twin, trained and evaluated end to end on a CPU.

What it does, in order, with nothing downloaded:
1. writes a synthetic long-video task set (`nsa_jax.data.synthetic`: needle, counting, order)
   under `OUT/data/{train,eval}/`;
2. trains a tiny VideoNSA (hybrid layers: dense for text queries, NSA for video queries) and
   its dense-attention twin (the same config with `model.attention.nsa=null`: the same
   parameters apart from the gates, the same data in the same order, the same steps) with
   the real training command (`nsa-jax train --config demo`), each in a process of its own
   so that its peak memory is its own;
3. exports each run's last step as `nsa-jax export` does (`OUT/<model>/model/`) and scores it
   with the real evaluation code (`nsa_jax.eval`: the prompts, greedy decoding and parsers of
   `nsa-jax eval --task needle|counting|order`);
4. prints the table (accuracy per task, training tokens/s, peak memory, tokens per sample),
   writes `OUT/demo.json` and `OUT/demo.png` (loss curves and accuracy), and prints the
   `nsa-jax generate` command that asks the trained model about one of the held-out videos.

Running it again with the same `--out` reuses what is there: the data, finished training runs
(the training command resumes from its checkpoints) and exported models.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nsa_jax import child
from nsa_jax.ckpt import export_model
from nsa_jax.data import synthetic
from nsa_jax.eval.runner import write_json

TASKS = ("needle", "counting", "order")
MODELS = ("videonsa", "dense")
LABELS = {"videonsa": "VideoNSA (hybrid)", "dense": "dense twin"}



def is_video_override(override: str) -> bool:
    """Whether a `key=value` override of the demo is a `synthetic.*` one: it describes the
    videos written (e.g. `synthetic.num_frames=160`), not the training run, which reads the
    written files."""
    return override.split("=", 1)[0].startswith("synthetic.")


def video_config(overrides: Sequence[str] = ()) -> synthetic.SyntheticConfig:
    """The videos of the train config `demo` (its `synthetic` section, after the
    `synthetic.*` entries of `overrides`), the one source of their size and cues."""
    from nsa_jax.train.config import load_config

    spec = load_config("demo", [o for o in overrides if is_video_override(o)]).synthetic
    assert spec is not None
    return spec.video()


def chance(video: synthetic.SyntheticConfig | None = None) -> dict[str, float]:
    """Accuracy of a uniform guess among the answers each task can have: one of the 8
    colours, 1 to `max_count` flashes, one of the two colours the question names."""
    video = video_config() if video is None else video
    return {"needle": 1 / len(synthetic.COLOURS), "counting": 1 / video.max_count,
            "order": 1 / 2}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What `nsa-jax demo` runs.

    Attributes:
      out: output directory.
      seed: seeds the data, the parameter initialisation and the data order.
      train_videos, eval_videos: videos per task for training and for the held-out evaluation.
      steps: optimiser steps of each training run (None: the `demo` config's).
      overrides: extra `key=value` overrides of the `demo` train config (both runs); its
        `synthetic.*` entries change the videos written instead (`is_video_override`).
      train_tasks: the tasks whose training videos the models learn from (every task is
        evaluated): all three by default; a subset isolates one task (e.g. `("order",)`).
      models: which of `MODELS` to train and score: both by default.
    """

    out: str = "demo_out"
    seed: int = 0
    train_videos: int = 256
    eval_videos: int = 30
    steps: int | None = None
    overrides: tuple[str, ...] = ()
    train_tasks: tuple[str, ...] = TASKS
    models: tuple[str, ...] = MODELS

    def __post_init__(self) -> None:
        for name, got, known in (("train_tasks", self.train_tasks, TASKS),
                                 ("models", self.models, MODELS)):
            if not got or not set(got) <= set(known):
                raise ValueError(f"{name} must be a non-empty subset of {known}, got {got}")


# ---------------------------------------------------------------------------------- data


def write_data(out: str, train_videos: int, eval_videos: int, seed: int,
               video: synthetic.SyntheticConfig | None = None) -> dict[str, Any]:
    """Writes (once) the train and eval splits of every task under `OUT/data/` (videos as
    `video`, default the demo config's); returns the annotation files and video roots. A
    `done.json` marker naming what was written makes the directory either complete and
    reused, or rewritten."""
    from tqdm import tqdm

    root = os.path.join(out, "data")
    video = video_config() if video is None else video
    spec = {"video": dataclasses.asdict(video), "train_videos": train_videos,
            "eval_videos": eval_videos, "seed": seed}
    marker = os.path.join(root, "done.json")
    if not (os.path.exists(marker) and _read_json(marker) == spec):
        shutil.rmtree(root, ignore_errors=True)
        # distinct seeds per split and task: the held-out videos are new draws
        jobs = [(split, task, n, 1000 * seed + 10 * i + (split == "eval"))
                for split, n in (("train", train_videos), ("eval", eval_videos))
                for i, task in enumerate(TASKS)]
        with tqdm(total=sum(j[2] for j in jobs), unit="video", desc="videos",
                  dynamic_ncols=True) as bar:
            for split, task, n, s in jobs:
                synthetic.write_dataset(os.path.join(root, split), task=task, num_videos=n,
                                        cfg=video, seed=s, on_video=lambda _: bar.update(1))
        write_json(marker, spec)
    return {
        split: {"root": os.path.join(root, split),
                "annotations": {t: os.path.join(root, split, f"{t}.jsonl") for t in TASKS}}
        for split in ("train", "eval")
    }


# ---------------------------------------------------------------------------------- training


def train_command(run_dir: str, data: dict[str, Any], settings: DemoSettings,
                  dense: bool) -> list[str]:
    """The `nsa-jax train` command line of one run (the dense twin: `model.attention.nsa=null`)."""
    train = data["train"]
    overrides = [
        "synthetic=null",
        "annotations=" + ",".join(train["annotations"][t] for t in settings.train_tasks),
        f"data.video_roots={train['root']}",
        f"seed={settings.seed}",
        f"data.seed={settings.seed}",
        *(o for o in settings.overrides if not is_video_override(o)),
    ]
    if settings.steps is not None:
        overrides.append(f"steps={settings.steps}")
    if dense:
        overrides.append("model.attention.nsa=null")
    return [sys.executable, "-m", "nsa_jax.cli", "train", "--config", "demo", "--out", run_dir,
            *overrides]


def run_training(cmd: list[str], log_path: str) -> dict[str, Any]:
    """Runs one training process (`nsa_jax.child.run`: its progress bar on the terminal, its
    log lines in `log_path`); returns its wall and CPU time and peak resident memory.

    Raises:
      RuntimeError: the run failed (the exit status and the end of its log).
    """
    stats = child.run(cmd, log_path)
    status = stats.pop("status")
    if status:
        raise RuntimeError(f"training failed (exit {status}); see {log_path}:\n"
                           + child.tail(log_path))
    return stats


def training_metrics(run_dir: str, skip: int = 2) -> dict[str, Any]:
    """From `metrics.jsonl`: the loss curve, tokens/s over the steps after the first `skip`
    (those include compilation), and the mean tokens per sample."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    if not recs:
        raise RuntimeError(f"the training run in {run_dir} recorded no step; its log says why")
    timed = recs[skip:] or recs
    rows = _config(run_dir)["per_shard_batch"]
    return {
        "steps": len(recs),
        "loss": [r["loss"] for r in recs],
        "final_loss": float(np.mean([r["loss"] for r in recs[-10:]])),
        "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
        "tokens_per_sample": sum(r["tokens"] for r in recs) / (rows * len(recs)),
        "step_time_s": float(np.median([r["step_time_s"] for r in timed])),
    }


def _config(run_dir: str) -> dict[str, Any]:
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as f:
        return yaml.safe_load(f)


def accuracy(results: dict[str, Any]) -> dict[str, Any]:
    """`{"accuracy": {task: %}, "mean_accuracy": %}` from `evaluate`'s results.

    Raises:
      RuntimeError: a task scored no video (every one failed to decode)."""
    unscored = [t for t in TASKS if results[t]["overall"] is None]
    if unscored:
        raise RuntimeError(f"no held-out video of {', '.join(unscored)} was scored; see "
                           "failed_videos in its results.json")
    acc = {t: results[t]["overall"] for t in TASKS}
    return {"accuracy": acc, "mean_accuracy": float(np.mean(list(acc.values())))}


# ---------------------------------------------------------------------------------- eval


def sampling(run_dir: str | None = None) -> Any:
    """The evaluation's video sampling: exactly the training pipeline's (fps, frames, pixels;
    the run's `config.yaml`, or the `demo` config's without a run) and the clip's own seconds
    per temporal patch, as the pipeline gives it."""
    from nsa_jax.eval.video_qa import VideoSampling
    from nsa_jax.train.config import CONFIGS, to_dict

    d = _config(run_dir)["data"] if run_dir else to_dict(CONFIGS["demo"].data)
    return VideoSampling(fps=d["fps"], max_frames=d["max_frames"], min_frames=d["min_frames"],
                         min_pixels=d["min_pixels"], max_pixels=d["max_pixels"],
                         total_pixels=d["total_pixels"], second_per_grid_ts=None)


def evaluate(model_dir: str, run_dir: str, data: dict[str, Any], out_dir: str,
             limit: int | None = None) -> dict[str, Any]:
    """Scores the model on every task's held-out videos with `nsa_jax.eval` (greedy, the
    task's token budget and parser); returns `{task: results.json dict}`."""
    from nsa_jax.eval.runner import run_eval
    from nsa_jax.eval.tasks import get_task, load_samples
    from nsa_jax.eval.video_qa import VideoQA

    qa = VideoQA(model_dir, dtype="float32", sampling=sampling(run_dir))
    results = {}
    for task_name in TASKS:
        task = get_task(task_name)
        samples = load_samples(task, data["eval"]["annotations"][task_name],
                               data["eval"]["root"], limit=limit)
        settings = {"ckpt": model_dir, "decoding": "greedy", "dtype": "float32",
                    "sampling": dataclasses.asdict(qa.sampling)}
        results[task_name] = run_eval(task, samples, qa, os.path.join(out_dir, task_name),
                                      settings=settings, table=io.StringIO())
    return results


# ---------------------------------------------------------------------------------- report


def table(summary: dict[str, Any]) -> str:
    """The terminal table: one column per model, plus chance."""
    m = summary["models"]
    keys = [k for k in MODELS if k in m]
    head = f"{'':<28}" + "".join(f"{LABELS[k]:>20}" for k in keys) + f"{'chance':>10}"
    lines = [head, "-" * len(head)]
    for t in TASKS:
        lines.append(f"{t + ' accuracy (%)':<28}"
                     + "".join(f"{m[k]['accuracy'][t]:>20.1f}" for k in keys)
                     + f"{summary['chance'][t]:>10.1f}")
    lines.append(f"{'mean accuracy (%)':<28}"
                 + "".join(f"{m[k]['mean_accuracy']:>20.1f}" for k in keys)
                 + f"{np.mean(list(summary['chance'].values())):>10.1f}")
    rows = (("training tokens/s", "tokens_per_s", "{:>20.0f}"),
            ("training step (s, median)", "step_time_s", "{:>20.2f}"),
            ("peak memory (GiB, RSS)", "peak_rss_gib", "{:>20.2f}"),
            ("tokens per sample", "tokens_per_sample", "{:>20.1f}"),
            ("final training loss", "final_loss", "{:>20.3f}"),
            ("training wall time (s)", "train_wall_s", "{:>20.0f}"),
            ("training CPU time (s)", "train_cpu_s", "{:>20.0f}"))
    for label, key, fmt in rows:
        lines.append(f"{label:<28}" + "".join(fmt.format(m[k][key]) for k in keys))
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: str) -> None:
    """Loss curves (left) and accuracy per task against chance (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in MODELS if k in summary["models"]]
    colours = {"videonsa": "tab:blue", "dense": "tab:orange"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        colour = colours[k]
        loss = np.asarray(summary["models"][k]["loss"])
        ax1.plot(np.arange(1, len(loss) + 1), loss, color=colour, alpha=0.25)
        w = max(1, len(loss) // 20)  # a moving average shows the trend under the batch noise
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax1.plot(np.arange(w, len(loss) + 1), smooth, color=colour, label=LABELS[k])
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (per answer token)")
    ax1.legend()
    x = np.arange(len(TASKS))
    for k in keys:
        acc = [summary["models"][k]["accuracy"][t] for t in TASKS]
        ax2.bar(x + (MODELS.index(k) - 0.5) * 0.38, acc, 0.38, label=LABELS[k],
                color=colours[k])
    for j, t in enumerate(TASKS):
        ax2.hlines(summary["chance"][t], j - 0.4, j + 0.4, colors="k", linestyles="dashed",
                   label="chance" if j == 0 else None)
    ax2.set_xticks(x, TASKS)
    # headroom above 100% for the legend: trained models reach the top of the axis
    ax2.set_ylim(0, 115)
    ax2.set_yticks(range(0, 101, 20))
    ax2.set_ylabel("held-out accuracy (%)")
    ax2.legend(loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"nsa-jax demo (seed {summary['seed']}): tiny VideoNSA vs its dense twin")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def generate_command(model_dir: str, run_dir: str | None, data: dict[str, Any],
                     task: str = "counting") -> tuple[str, str]:
    """The `nsa-jax generate` command asking the model about the first held-out video of
    `task` (counting: the task the tiny model learns first, docs/benchmarks.md), with the
    sampling it was trained with; and that video's answer."""
    eval_ = data["eval"]
    with open(eval_["annotations"][task]) as f:
        rec = json.loads(f.readline())
    question = next(t["value"] for t in rec["conversations"] if t["from"] == "human")
    answer = next(t["value"] for t in rec["conversations"] if t["from"] == "gpt")
    s = sampling(run_dir)
    cmd = ["nsa-jax", "generate", "--ckpt", model_dir,
           "--video", os.path.join(eval_["root"], rec["video"]),
           "--prompt", question.replace("<video>", "", 1).strip(),
           "--fps", f"{s.fps:g}", "--max-frames", str(s.max_frames),
           "--min-pixels", str(s.min_pixels), "--max-pixels", str(s.max_pixels),
           "--second-per-grid-ts", "auto", "--dtype", "float32", "--max-new-tokens", "16"]
    return shlex.join(cmd), answer


# ---------------------------------------------------------------------------------- main


def run(settings: DemoSettings, eval_limit: int | None = None) -> dict[str, Any]:
    """The whole demo; returns (and writes to `OUT/demo.json`) the summary."""
    out = os.path.abspath(settings.out)
    os.makedirs(out, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    say = _stage_printer(1 + 2 * len(settings.models))

    say("writing the synthetic videos (needle, counting, order)")
    t0 = time.perf_counter()
    video = video_config(settings.overrides)
    data = write_data(out, settings.train_videos, settings.eval_videos, settings.seed, video)
    data_s = time.perf_counter() - t0

    models: dict[str, dict[str, Any]] = {}
    for k in settings.models:
        run_dir = os.path.join(out, k)
        say(f"training {LABELS[k]} (nsa-jax train --config demo"
            + (" model.attention.nsa=null)" if k == "dense" else ")"))
        cmd = train_command(run_dir, data, settings, dense=k == "dense")
        stats = run_training(cmd, os.path.join(out, f"train_{k}.log"))
        models[k] = {**training_metrics(run_dir), "train_wall_s": stats["wall_s"],
                     "train_cpu_s": stats["cpu_s"],
                     "peak_rss_gib": stats["peak_rss_bytes"] / 2**30,
                     "train_command": shlex.join(cmd)}

    for k in settings.models:
        run_dir = os.path.join(out, k)
        say(f"evaluating {LABELS[k]} on the held-out videos (nsa_jax.eval)")
        t0 = time.perf_counter()
        model_dir = os.path.join(run_dir, "model")
        export_model(run_dir, model_dir, replace=True)
        res = evaluate(model_dir, run_dir, data, os.path.join(out, "eval", k), eval_limit)
        models[k].update(accuracy(res))
        models[k]["eval_counts"] = {t: res[t]["counts"] for t in TASKS}
        models[k]["eval_wall_s"] = time.perf_counter() - t0
        models[k]["model_dir"] = model_dir

    summary = {
        "seed": settings.seed,
        "settings": dataclasses.asdict(settings),
        "video": dataclasses.asdict(video),
        "chance": {t: 100 * chance(video)[t] for t in TASKS},
        "models": models,
        "data_wall_s": data_s,
        "total_wall_s": time.perf_counter() - t_start,
        "total_cpu_s": _cpu_seconds() - cpu_start,
    }
    write_json(os.path.join(out, "demo.json"), summary)
    plot(summary, os.path.join(out, "demo.png"))
    first = settings.models[0]
    cmd, answer = generate_command(models[first]["model_dir"], os.path.join(out, first), data)
    print()
    print(table(summary))
    print(f"\ntotal {summary['total_wall_s'] / 60:.1f} min ({summary['total_cpu_s'] / 60:.1f} "
          f"CPU-min); wrote {out}/demo.json, "
          f"{out}/demo.png, checkpoints in {out}/{{{','.join(settings.models)}}}/")
    print(f"\nAsk the trained {LABELS[first]} about a held-out video (the answer is "
          f"{answer!r}):\n  " + cmd)
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the training runs)."""
    import resource

    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _stage_printer(total: int) -> Any:
    n = 0

    def say(text: str) -> None:
        nonlocal n
        n += 1
        print(f"[{n}/{total}] {text}", file=sys.stderr, flush=True)

    return say


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------- CLI

DESCRIPTION = """\
Trains a tiny VideoNSA and its dense-attention twin on synthetic long-video tasks
(needle, counting, order) with the real training loop, scores both with the real
evaluation code, and prints accuracy, training tokens/s, peak memory and tokens per
sample. CPU only is fine, nothing downloaded: 7 to 13 minutes on 2 quiet cores, by the
machine (11-21 CPU-minutes; docs/benchmarks.md has what was measured).

  --out DIR   data/ (videos), videonsa/ and dense/ (training runs: checkpoints,
              metrics.jsonl, config.yaml; model/ the exported checkpoint),
              eval/ (predictions and results per task), demo.json, demo.png
  key=value   overrides of the `demo` training config for both runs, e.g.
              optim.lr=1e-3 model.attention.nsa.window=16 (see docs/training.md); synthetic.*
              ones change the videos written instead, e.g. 4x longer videos:
              synthetic.num_frames=160 data.max_frames=160 data.total_pixels=501760
              data.max_tokens=384 data.bucket_lengths=384 (~20 minutes)

Running it again with the same --out reuses the data, the finished runs and the
exported models. See docs/benchmarks.md for what several seeds give.
"""


def register(subparsers: Any) -> None:
    import argparse

    p = subparsers.add_parser(
        "demo",
        help="train and evaluate a tiny VideoNSA and its dense twin on synthetic videos (CPU)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DemoSettings()
    p.add_argument("--out", default=d.out, metavar="DIR", help=f"default {d.out}")
    p.add_argument("--seed", type=int, default=d.seed, help="data, initialisation, data order")
    p.add_argument("--steps", type=int, metavar="N",
                   help="optimiser steps per model (default: the demo config's)")
    p.add_argument("--train-videos", type=int, default=d.train_videos, metavar="N",
                   help=f"training videos per task (default {d.train_videos})")
    p.add_argument("--eval-videos", type=int, default=d.eval_videos, metavar="N",
                   help=f"held-out videos per task (default {d.eval_videos})")
    p.add_argument("--train-tasks", default=",".join(d.train_tasks), metavar="T,T",
                   help="tasks to train on (all are evaluated; default all three)")
    p.add_argument("--models", default=",".join(d.models), metavar="M,M",
                   help=f"which of {','.join(MODELS)} to train and score (default both)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_demo)


def _demo(args: Any) -> int:
    try:
        settings = DemoSettings(out=args.out, seed=args.seed, steps=args.steps,
                                train_videos=args.train_videos, eval_videos=args.eval_videos,
                                overrides=tuple(args.overrides),
                                train_tasks=tuple(args.train_tasks.split(",")),
                                models=tuple(args.models.split(",")))
        run(settings)
    except (RuntimeError, ValueError) as e:
        print(f"nsa-jax demo: {e}", file=sys.stderr)
        return 1
    return 0
