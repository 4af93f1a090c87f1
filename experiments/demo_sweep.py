"""Demo settings sweep: runs `nsa-jax demo` (both models, the real training and evaluation)
for several settings and seeds at once, and tabulates held-out accuracy per task.

What a setting may change is what `nsa-jax demo` takes: `steps`, `videos` (training videos
per task), `tasks` (the tasks trained on, e.g. `order`; all are evaluated), `models`
(`videonsa`, `dense` or both) and any `key=value` override of the `demo` training config.
Settings are written `NAME;key=value;key=value...` (`;` because config values such as `4,2,2`
hold commas):

    python experiments/demo_sweep.py --seeds 0,1 --workers 8 --gpus 0,1 \\
        --setting 'base' --setting 'long;steps=900;videos=1024' \\
        --setting 'lr3e-3;optim.lr=3e-3' \
        --setting 'order_only;tasks=order;models=videonsa'
    python experiments/demo_sweep.py --quick --out DIR       # CPU smoke run (tests)

Each (setting, seed) is one demo process in `--work/<name>_s<seed>` (reused when run
again, as the demo reuses its own output); `--workers` run at a time, on the `--gpus`
round-robin (none: the CPU). The videos of each (videos, seed) are written once and shared.
A demo that fails is recorded with its error and the sweep goes on. Writes
`demo_sweep.json` (every run's accuracies, times and the mean over seeds; rewritten after
every run) and `demo_sweep.png` (mean accuracy per task and setting, chance dashed) under
`--out` (default `docs/figures/`). The shipped demo's seeds are `nsa-jax demo --seed N`
runs on a CPU (docs/benchmarks.md). On a GPU host the step is host work (padding, the
decoding of the first epoch) plus a tiny device step: 12 demos at once on 2 H200s (32 host
cores) took 0.06-0.09 s a step: 12 demos of 320-580 steps trained in ~3.6 minutes there,
most of it start-up, compiling and decoding the first epoch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from nsa_jax import demo  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def parse_setting(text: str) -> dict[str, Any]:
    """`NAME;steps=N;videos=N;tasks=T,T;models=M,M;key=value...` -> a dict of those (None:
    the demo's default) and the remaining `overrides`."""
    name, *fields = text.split(";")
    if not name or "=" in name:
        raise ValueError(f"--setting {text!r}: starts with a name, e.g. 'long;steps=900'")
    out: dict[str, Any] = {"name": name, "steps": None,
                           "videos": demo.DemoSettings.train_videos, "tasks": None,
                           "models": None, "overrides": []}
    for f in fields:
        key, sep, value = f.partition("=")
        if not sep:
            raise ValueError(f"--setting {text!r}: {f!r} is not key=value")
        if key in ("steps", "videos"):
            out[key] = int(value)
        elif key in ("tasks", "models"):
            out[key] = value
        else:
            out["overrides"].append(f)
    return out


def demo_command(setting: dict[str, Any], seed: int, out: str, eval_videos: int) -> list[str]:
    """The `nsa-jax demo` command line of one (setting, seed) writing to `out`."""
    cmd = [sys.executable, "-m", "nsa_jax.cli", "demo", "--out", out, "--seed", str(seed),
           "--train-videos", str(setting["videos"]), "--eval-videos", str(eval_videos)]
    for key, flag in (("steps", "--steps"), ("tasks", "--train-tasks"), ("models", "--models")):
        if setting[key] is not None:
            cmd += [flag, str(setting[key])]
    return cmd + setting["overrides"]


def write_shared_data(work: str, videos: int, eval_videos: int, seed: int) -> str:
    """The videos of one (training videos, seed), written once; returns their `data/`."""
    root = os.path.join(work, "_data", f"v{videos}_e{eval_videos}_s{seed}")
    demo.write_data(root, videos, eval_videos, seed)
    return os.path.join(root, "data")


def run_one(setting: dict[str, Any], seed: int, work: str, data_dir: str, eval_videos: int,
            gpu: str | None) -> dict[str, Any]:
    """One demo in a process of its own (on GPU `gpu` when given), its videos linked from
    `data_dir`; its record: accuracies and times per model, or the error that ended it."""
    out = os.path.join(work, f"{setting['name']}_s{seed}")
    os.makedirs(out, exist_ok=True)
    link, target = os.path.join(out, "data"), os.path.abspath(data_dir)
    if not (os.path.islink(link) and os.readlink(link) == target):
        # a setting renamed onto another's videos: its link must not write into theirs
        if os.path.islink(link):
            os.remove(link)
        elif os.path.exists(link):
            shutil.rmtree(link)
        os.symlink(target, link)
    env = dict(os.environ)
    if gpu is not None:
        # several demos share a GPU: none may take the default 75% of its memory up front
        env.update(CUDA_VISIBLE_DEVICES=gpu, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    rec: dict[str, Any] = {"setting": setting["name"], "seed": seed}
    t0 = time.perf_counter()
    with open(os.path.join(out, "sweep.log"), "w") as log:
        proc = subprocess.run(demo_command(setting, seed, out, eval_videos), env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    rec["wall_s"] = time.perf_counter() - t0
    summary_path = os.path.join(out, "demo.json")
    if proc.returncode or not os.path.exists(summary_path):
        with open(os.path.join(out, "sweep.log")) as f:
            rec["error"] = f.read()[-1500:]
        return rec
    with open(summary_path) as f:
        summary = json.load(f)
    for k, m in summary["models"].items():
        rec[k] = {"accuracy": m["accuracy"], "final_loss": m["final_loss"],
                  "step_time_s": m["step_time_s"], "train_wall_s": m["train_wall_s"]}
    return rec


def mean_over_seeds(setting: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["setting"] == setting and "error" not in r]
    out: dict[str, Any] = {"setting": setting, "seeds": [r["seed"] for r in ok]}
    for k in demo.MODELS:
        if ok and all(k in r for r in ok):
            out[k] = {t: float(np.mean([r[k]["accuracy"][t] for r in ok])) for t in demo.TASKS}
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [m for m in result["means"] if any(k in m for k in demo.MODELS)]
    models = [k for k in demo.MODELS if any(k in m for m in means)]
    width = 0.76 / max(1, len(models))
    # many settings: wider panels and upright names, so the labels do not overlap
    many = len(means) > 6
    fig, axes = plt.subplots(1, len(demo.TASKS), sharey=True, figsize=(
        max(4.2, 0.45 * len(means) * len(models)) * len(demo.TASKS), 5 if many else 4))
    x = np.arange(len(means))
    for ax, task in zip(axes, demo.TASKS, strict=True):
        for i, k in enumerate(models):  # a setting without this model leaves a gap (NaN)
            ax.bar(x + (i - (len(models) - 1) / 2) * width,
                   [m[k][task] if k in m else np.nan for m in means], width,
                   label=demo.LABELS[k])
        ax.axhline(100 * demo.chance()[task], color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(x, [f"{m['setting']}\n({len(m['seeds'])} seeds)" for m in means],
                      fontsize=7, rotation=90 if many else 30)
        ax.set_title(task)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("held-out accuracy (%, mean over seeds)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", default=[], metavar="NAME;key=value...")
    p.add_argument("--seeds", default="0")
    p.add_argument("--eval-videos", type=int, default=demo.DemoSettings.eval_videos)
    p.add_argument("--workers", type=int, default=1, help="demos at a time")
    p.add_argument("--gpus", default="", help="GPU ids dealt round-robin (none: the CPU)")
    p.add_argument("--out", type=Path, default=FIGURES)
    p.add_argument("--work", help="runs and data (default: OUT/demo_sweep_runs)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: one setting, 2 steps, 4 videos, 1 held-out")
    args = p.parse_args(argv)
    settings = [parse_setting(s) for s in args.setting] or [parse_setting("base")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        settings = [{**settings[0], "steps": 2, "videos": 4}]
        seeds, args.eval_videos = seeds[:1], 1
    if len({s["name"] for s in settings}) < len(settings):
        raise SystemExit("demo_sweep: setting names must differ")
    work = args.work or str(args.out / "demo_sweep_runs")
    gpus = [g for g in args.gpus.split(",") if g]
    t0 = time.perf_counter()
    combos = sorted({(s["videos"], seed) for s in settings for seed in seeds})
    with concurrent.futures.ProcessPoolExecutor(max(1, min(args.workers, len(combos)))) as ex:
        data = dict(zip(combos, ex.map(write_shared_data, *zip(*[
            (work, v, args.eval_videos, seed) for v, seed in combos], strict=True)),
            strict=True))
    jobs = [(s, seed) for s in settings for seed in seeds]
    runs: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> dict[str, Any]:
        result = {"command": " ".join(["python", "experiments/demo_sweep.py", *sys.argv[1:]]),
                  "settings": settings, "seeds": seeds, "quick": args.quick,
                  "chance": {t: 100 * c for t, c in demo.chance().items()},
                  "runs": sorted(runs, key=lambda r: (r["setting"], r["seed"])),
                  "means": [mean_over_seeds(s["name"], runs) for s in settings],
                  "wall_s": time.perf_counter() - t0}
        (args.out / "demo_sweep.json").write_text(json.dumps(result, indent=1))
        plot(result, args.out / "demo_sweep.png")
        return result

    with concurrent.futures.ThreadPoolExecutor(max(1, args.workers)) as ex:
        futures = [ex.submit(run_one, s, seed, work, data[(s["videos"], seed)],
                             args.eval_videos, gpus[i % len(gpus)] if gpus else None)
                   for i, (s, seed) in enumerate(jobs)]
        for fut in concurrent.futures.as_completed(futures):
            runs.append(fut.result())
            r = runs[-1]
            print(json.dumps({k: v for k, v in r.items() if k != "error"})
                  + ("  FAILED" if "error" in r else ""), flush=True)
            write()  # a sweep stopped early keeps the runs it finished
    for m in write()["means"]:
        print(json.dumps(m))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
