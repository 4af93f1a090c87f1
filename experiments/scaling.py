"""Scaling: step time and peak memory of training and of prefill, hybrid VideoNSA against its
dense twin (the same model with `nsa=None`), from 8K to 128K tokens on one accelerator.

Each (mode, variant, length) runs in a process of its own (`--case`), so the peak memory it
reports is its own and an out-of-memory error ends only that case (recorded, the sweep goes
on). Rows are laid out as VideoNSA's data are (`nsa_jax.train.batch.synthetic_batch`: a short
text, one video of ~90% of the row in 16 x 16-patch frames, text, then answer tokens):
- `train`: one optimiser step of the config's real `Trainer` (forward, backward, AdamW), via
  `experiments/bench_train.py`'s `bench_one`: median over `--steps` after a compiling step;
- `prefill`: the forward pass over the whole row (the trainer's loss from the parameters
  alone, `eval_loss`: every layer on every token, logits only at the answer positions, as a
  prompt's prefill computes them before its last-token logits), compiled once, median over
  `--steps` calls, holding what inference holds: the weights in the compute dtype (bf16) and
  no optimiser state.
Peak memory: the allocator's peak on a GPU/TPU (`memory_stats`), and the compiled program's
own size from XLA's memory analysis (any backend, the CPU included).

    python experiments/scaling.py --config gpu-small \\
        --lengths 8192,16384,32768,65536,131072                  # one GPU: the 3B shape
    python experiments/scaling.py --config videonsa-7b-36k --modes prefill \\
        --name scaling_7b    # the 7B shape on one GPU: prefill (its train step does not fit)
    python experiments/scaling.py --quick --out DIR              # CPU smoke run (tiny)

Writes `scaling.json` and `scaling.png` (`--name`) under `--out` (default `docs/figures/`).
A file already there from the same config and overrides keeps the cases this call does not
measure again (a sweep may take several calls), and lists every call's command.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"
QUICK = ["model.text.num_hidden_layers=1", "model.vision.depth=1",
         "model.vision.fullatt_block_indexes=0"]


def prefill_one(cfg: Any, length: int, rows: int, steps: int, frame: int) -> dict[str, Any]:
    """Times the forward pass of `rows` rows of `length` tokens (random parameters), holding
    what an inference run holds: the weights in the compute dtype, no optimiser state."""
    import jax
    import numpy as np
    from bench_train import peak_memory

    from nsa_jax.data.config import numpy_dtype
    from nsa_jax.train import sharding
    from nsa_jax.train.batch import model_batch, synthetic_batch
    from nsa_jax.train.step import Trainer, init_params

    mesh = sharding.make_mesh(cfg.mesh)
    cfg = dataclasses.replace(cfg, per_shard_batch=max(1, rows // sharding.batch_shards(mesh)),
                              param_dtype=cfg.compute_dtype)
    trainer = Trainer.build(cfg, mesh)
    shardings = {**trainer.state_shardings.params, **trainer.state_shardings.frozen}
    params, frozen = trainer.split(init_params(trainer.model_def, cfg.seed, shardings))
    raw = synthetic_batch(cfg.model, rows, length, answer_tokens=1, frame_patches=(frame, frame),
                          pixel_dtype=numpy_dtype(cfg.data.pixel_dtype))
    batch = trainer.put_batch(model_batch(raw, cfg.model))
    t0 = time.perf_counter()
    forward = trainer.eval_loss.lower(params, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = forward.memory_analysis()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, frozen, batch))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = int((raw["segment_ids"] > 0).sum())
    return {
        "rows": rows, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "device_kind": jax.devices()[0].device_kind,
        "peak_memory_gib": None if (p := peak_memory()) is None else p / 2**30,
        "compiled_step_gib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                              + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30,
    }


def run_case(args: argparse.Namespace) -> int:
    """One (mode, variant, length) in this process; prints its record as the last line."""
    from bench_train import bench_one

    from nsa_jax.train.config import load_config

    mode, variant, length = args.case.split(",")
    cfg = load_config(args.config, args.overrides)
    if variant == "dense":
        cfg = dataclasses.replace(cfg, model=cfg.model.with_attention(nsa=None))
    rec: dict[str, Any] = {"mode": mode, "variant": variant, "length": int(length),
                           "config": cfg.name}
    if mode == "train":
        r = bench_one(cfg, int(length), args.rows, args.steps, args.answer, args.frame)
        rec.update({k: r[k] for k in ("rows", "step_s", "tokens_per_s", "device_kind",
                                      "peak_memory_gib", "compiled_step_gib",
                                      "compile_and_first_step_s", "mfu")})
    else:
        rec.update(prefill_one(cfg, int(length), args.rows or 1, args.steps, args.frame))
    print(json.dumps(rec), flush=True)
    return 0


def plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("train", "prefill") if any(r["mode"] == m for r in records)]
    fig, axes = plt.subplots(len(modes), 2, figsize=(10, 3.5 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        for col, (key, label) in enumerate((("step_s", "step time (s)"),
                                            ("memory_gib", "peak memory (GiB)"))):
            ax = axes[row, col]
            for variant, marker in (("hybrid", "o"), ("dense", "s")):
                pts = sorted((r["length"], r[key]) for r in records
                             if r["mode"] == mode and r["variant"] == variant
                             and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=marker, label=variant)
                failed = [r["length"] for r in records if r["mode"] == mode
                          and r["variant"] == variant and "error" in r]
                for x in failed:
                    ax.axvline(x, color="tab:red" if variant == "dense" else "tab:purple",
                               ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens per row")
            ax.set_title(f"{mode}: {label}")
            ax.legend(fontsize=8)
    fig.suptitle(title + " (dotted: failed, e.g. out of memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_in_process(args: argparse.Namespace, mode: str, variant: str, length: int,
                   gpu: str | None) -> dict[str, Any]:
    """One case in a process of its own (on GPU `gpu` when given); its record, or the
    error that ended it (an out-of-memory error ends the case, not the sweep)."""
    cmd = [sys.executable, __file__, "--case", f"{mode},{variant},{length}",
           "--config", args.config, "--steps", str(args.steps),
           "--answer", str(args.answer), "--frame", str(args.frame),
           *(["--rows", str(args.rows)] if args.rows else []), *args.overrides]
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
    rec: dict[str, Any] = {"mode": mode, "variant": variant, "length": length}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        rec["error"] = f"timed out after {args.timeout:.0f} s"
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            rec = json.loads(lines[-1])
        else:
            rec["error"] = (proc.stderr or proc.stdout)[-1500:]
    rec["memory_gib"] = rec.get("peak_memory_gib") or rec.get("compiled_step_gib")
    return rec


def case_key(rec: dict[str, Any]) -> tuple[str, str, int]:
    return rec["mode"], rec["variant"], rec["length"]


def earlier_results(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `--name` file already under `--out` when it holds the same config, overrides and
    `--quick` (its cases are kept beside this call's: a sweep may take several calls), else
    None."""
    path = args.out / f"{args.name}.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    same = (old.get("config"), old.get("overrides"), old.get("quick")) == (
        args.config, args.overrides, args.quick)
    if not same:
        print(f"{path}: another config or overrides; replaced by this call's results")
    return old if same else None


def write_results(args: argparse.Namespace, records: list[dict[str, Any]],
                  earlier: dict[str, Any] | None) -> None:
    """`NAME.json` and `NAME.png` under `--out`: this call's cases, and the earlier file's
    cases this call did not measure again, with every call's command."""
    command = " ".join(["python", "experiments/scaling.py", *sys.argv[1:]])
    out = dict(earlier or {})
    measured = {case_key(r) for r in records}
    kept = [r for r in out.get("records", []) if case_key(r) not in measured]
    out.update(commands=[*out.get("commands", []), command], config=args.config,
               overrides=args.overrides, quick=args.quick,
               records=sorted(kept + records, key=case_key))
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    plot(out["records"], args.out / f"{args.name}.png", f"{args.config}: hybrid vs dense twin")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="videonsa-7b-36k")
    p.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    p.add_argument("--modes", default="train,prefill")
    p.add_argument("--rows", type=int, help="rows per step (default: the config's)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--answer", type=int, default=64, help="supervised tokens per row (train)")
    p.add_argument("--frame", type=int, default=16, help="patches per frame side (16: 224 px)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--gpus", default="",
                   help="GPU ids: one case at a time on each, in parallel (default: one at a "
                        "time on what the process sees)")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny config, T=128,256")
    p.add_argument("--out", type=Path, default=FIGURES)
    p.add_argument("--name", default="scaling", help="file stem of the JSON and PNG")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.lengths, args.steps, args.answer, args.frame = "tiny", "128,256", 2, 4, 4
        args.overrides = [*QUICK, *args.overrides]
    if args.case:
        return run_case(args)
    cases = [(mode, variant, int(length)) for length in args.lengths.split(",")
             for mode in args.modes.split(",") for variant in ("hybrid", "dense")]
    gpus = [g for g in args.gpus.split(",") if g] or [None]
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_results(args)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker(gpu: str | None) -> None:
        while True:
            with lock:
                if not cases:
                    return
                case = cases.pop(0)
            rec = run_in_process(args, *case, gpu)
            with lock:  # written after every case: a sweep stopped early keeps what it has
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "error"})
                      + ("  FAILED" if "error" in rec else ""), flush=True)
                write_results(args, records, earlier)

    # a worker's own failure (not a case's: those are records) ends the sweep with its error
    with concurrent.futures.ThreadPoolExecutor(len(gpus)) as pool:
        for fut in [pool.submit(worker, g) for g in gpus]:
            fut.result()
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
