"""Global-local budget split: at a fixed attention budget per video query (selected tokens +
window + compressed tokens), sweep the split between selection (global: `num_selected` blocks
of `block_size` tokens) and the sliding window (local); train a tiny VideoNSA at each split on
the `nsa-jax demo` task set and score it on the held-out videos. Where does accuracy peak?

The paper (VideoNSA, finding 2): at a fixed budget, settings near the training ratio win and
more budget to global (selection) beats more to local (window). With the compression block
length fixed, the compressed tokens a query sees (`T / stride`) are the same at every split,
so the sweep moves `num_selected * block_size + window = --budget` tokens between the two.
Each split is one `nsa-jax train --config demo` run (same data, seed, steps) with
`model.attention.nsa.num_selected=n model.attention.nsa.window=w`, scored by `nsa_jax.eval`
(the demo's code).
The paper's protocol, one model trained at one split and evaluated at every split, is the
second series: the model trained at the config's split (else the first one run) is scored
again with only its checkpoint's `num_selected` and `window` changed.

    python experiments/budget_split.py --budget 64 --steps 250 --out docs/figures
    python experiments/budget_split.py --name budget_split_long \
        synthetic.num_frames=160 data.max_frames=160 data.total_pixels=501760 \
        data.max_tokens=384 data.bucket_lengths=384   # 4x longer videos, same budget
    python experiments/budget_split.py --quick --out DIR   # CPU smoke run: 2 splits, 2 steps

`key=value` overrides apply to every run (the demo config's; `synthetic.*` ones change the
videos written, `demo.is_video_override`). Writes `NAME.json` and `NAME.png` (`--name`, default
`budget_split`) under `--out` (default `docs/figures/`); the runs go to `--work` (default
`OUT/NAME_runs`, kept for reuse).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from nsa_jax import demo  # noqa: E402
from nsa_jax.ckpt import export_model  # noqa: E402
from nsa_jax.train.config import load_config  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def splits(budget: int, block: int) -> list[tuple[int, int]]:
    """Every `(num_selected, window)` with `num_selected * block + window == budget`,
    `num_selected >= 1` (the query's own block is always selected) and `window >= 0`."""
    return [(n, budget - n * block) for n in range(1, budget // block + 1)]


def run_split(work: str, data: dict[str, Any], seed: int, steps: int | None, n: int, w: int,
              eval_limit: int | None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    run_dir = os.path.join(work, f"sel{n}_win{w}")
    settings = demo.DemoSettings(out=work, seed=seed, steps=steps, overrides=(
        *overrides, f"model.attention.nsa.num_selected={n}", f"model.attention.nsa.window={w}"))
    cmd = demo.train_command(run_dir, data, settings, dense=False)
    stats = demo.run_training(cmd, os.path.join(work, f"train_sel{n}_win{w}.log"))
    metrics = demo.training_metrics(run_dir)
    model_dir = os.path.join(run_dir, "model")
    export_model(run_dir, model_dir, replace=True)
    res = demo.evaluate(model_dir, run_dir, data, os.path.join(run_dir, "eval"), eval_limit)
    return {"num_selected": n, "window": w, **demo.accuracy(res),
            "final_loss": metrics["final_loss"], "train_wall_s": stats["wall_s"],
            "run_dir": run_dir}


def at_inference(work: str, data: dict[str, Any], run_dir: str, n: int, w: int,
                 eval_limit: int | None) -> dict[str, Any]:
    """Scores the model trained in `run_dir` with its split changed to `n` blocks + `w`:
    a model directory whose `config.json` differs in those two fields and whose parameters
    are the trained ones (linked), built afresh each time (it costs nothing) under the
    trained run's own directory."""
    trained = os.path.join(run_dir, "model")
    model_dir = os.path.join(run_dir, "at_split", f"sel{n}_win{w}")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.makedirs(model_dir)
    with open(os.path.join(trained, "config.json")) as f:
        config = json.load(f)
    config["nsa"].update(num_selected=n, window=w)
    for name in os.listdir(trained):
        if name != "config.json":
            os.symlink(os.path.abspath(os.path.join(trained, name)),
                       os.path.join(model_dir, name))
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    res = demo.evaluate(model_dir, run_dir, data, os.path.join(model_dir, "eval"), eval_limit)
    return {"num_selected": n, "window": w, **demo.accuracy(res)}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("splits", f"trained at each split ({result['steps']} steps each)")]
    if result.get("inference"):
        t = result["inference_trained_at"]
        series.append(("inference", f"trained at {t[0]}x{result['block_size']} + w{t[1]}, "
                                    "evaluated at each"))
    fig, axes = plt.subplots(1, len(series), figsize=(5.6 * len(series), 4.2), sharey=True,
                             squeeze=False)
    for ax, (key, title) in zip(axes[0], series, strict=True):
        recs = result[key]
        labels = [f"{r['num_selected']}x{result['block_size']}\n+ w{r['window']}" for r in recs]
        x = np.arange(len(recs))
        for task in demo.TASKS:
            ax.plot(x, [r["accuracy"][task] for r in recs], marker="o", label=task, alpha=0.7)
        ax.plot(x, [r["mean_accuracy"] for r in recs], marker="s", color="k", lw=2,
                label="mean")
        ax.set_xticks(x, labels)
        ax.set_xlabel(f"selected blocks x block + window = {result['budget']} tokens\n"
                      "(left: more local, right: more global)")
        ax.set_ylim(0, 112)  # lines at 100% stay clear of the frame and of the legend
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(title, fontsize=10)
    axes[0, 0].set_ylabel("held-out accuracy (%)")
    axes[0, 0].legend(fontsize=8, loc="upper center", ncol=4, frameon=False)
    fig.suptitle(f"Budget split (seed {result['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=int,
                   help="selected + window tokens (default: the demo config's)")
    p.add_argument("--steps", type=int, help="steps per run (default: the demo config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-videos", type=int, default=demo.DemoSettings.train_videos)
    p.add_argument("--eval-videos", type=int, default=demo.DemoSettings.eval_videos)
    p.add_argument("--out", type=Path, default=FIGURES)
    p.add_argument("--work", help="runs and data (default: OUT/budget_split_runs)")
    p.add_argument("--name", default="budget_split",
                   help="stem of the JSON and PNG written under --out")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 splits, 2 steps")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the demo config for every run; synthetic.* ones change "
                        "the videos (e.g. synthetic.num_frames=160 data.max_frames=160)")
    args = p.parse_args(argv)
    overrides = tuple(args.overrides)
    cfg = load_config("demo", overrides)
    nsa = cfg.model.nsa
    if nsa is None:
        p.error("the budget split needs NSA: drop model.attention.nsa=null")
    if args.budget is None:
        args.budget = nsa.num_selected * nsa.block_size + nsa.window
    work = args.work or str(args.out / f"{args.name}_runs")
    chosen = splits(args.budget, nsa.block_size)
    eval_limit = None
    if args.quick:
        args.steps, args.train_videos, args.eval_videos, eval_limit = 2, 4, 1, 1
        chosen = [chosen[0], chosen[-1]]
    t0 = time.perf_counter()
    video = demo.video_config(overrides)
    data = demo.write_data(work, args.train_videos, args.eval_videos, args.seed, video)
    recs = []
    for n, w in chosen:
        print(f"split: {n} selected blocks of {nsa.block_size} + window {w}", file=sys.stderr)
        recs.append(run_split(work, data, args.seed, args.steps, n, w, eval_limit, overrides))
        print(json.dumps(recs[-1]), flush=True)
    trained = next((r for r in recs if (r["num_selected"], r["window"])
                    == (nsa.num_selected, nsa.window)), recs[0])
    inference = []
    for n, w in chosen:
        print(f"the {trained['num_selected']} + {trained['window']} model at {n} + {w}",
              file=sys.stderr)
        inference.append(at_inference(work, data, trained["run_dir"], n, w, eval_limit))
        print(json.dumps(inference[-1]), flush=True)
    result = {"command": " ".join(["python", "experiments/budget_split.py", *sys.argv[1:]]),
              "budget": args.budget, "block_size": nsa.block_size, "seed": args.seed,
              "steps": args.steps or cfg.steps, "quick": args.quick,
              "overrides": list(overrides),
              "video": dataclasses.asdict(video),
              "splits": recs, "best": max(recs, key=lambda r: r["mean_accuracy"]),
              "inference_trained_at": [trained["num_selected"], trained["window"]],
              "inference": inference,
              "wall_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
