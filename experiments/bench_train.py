"""Train-step benchmark: tokens/s, MFU and peak memory of a train config at given lengths,
hybrid (NSA) against its dense twin (the same model with `nsa=None`).

Each (length, variant) builds the config's `Trainer` on the mesh, creates the state (random
init), and times `--steps` optimiser steps (after one warm-up step that compiles) on random
rows of exactly `length` tokens laid out as VideoNSA's data are (a short text, one video of
~90% of the row with 16 x 16-patch frames (224 x 224 px), text, then `--answer` supervised
tokens). Reported per step: wall time, tokens/s (global and per device), MFU from the
NSA-aware FLOP count (`nsa_jax.train.flops`), the device's peak memory (GPU/TPU allocator
statistics) and the compiled step's memory (XLA's analysis, any backend), and the losses.

    python experiments/bench_train.py --config gpu-small --lengths 32768,131072 --out DIR
    python experiments/bench_train.py --config videonsa-7b-36k --lengths 36864 --rows 2 \\
        --mesh fsdp=2 --no-twin --out DIR2 model.text.num_hidden_layers=8
    python experiments/bench_train.py --compare DIR/results.json DIR2/results.json
    python experiments/bench_train.py --merge A/results.json B/results.json --out DIR3
    python experiments/bench_train.py --quick --out DIR      # CPU smoke run (tiny config)

`--rows` fixes the global rows per micro-batch (default: the config's per-shard batch times
the data x fsdp shards), so runs on different meshes see the same batch and their losses
compare. Writes `results.json` and `tokens_per_s.png` under `--out`; `--merge` joins the records
of runs made apart (the dense twin in its own process, so each peak memory is its own) into one
plot and prints them as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# as in bench_model.py: long rows need nearly all of a GPU, which JAX's default BFC allocator
# (75% of the device, freed regions kept apart) does not give
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nsa_jax.data.config import numpy_dtype  # noqa: E402
from nsa_jax.train import sharding  # noqa: E402
from nsa_jax.train.batch import model_batch, synthetic_batch  # noqa: E402
from nsa_jax.train.config import TrainConfig, load_config  # noqa: E402
from nsa_jax.train.flops import (  # noqa: E402
    batch_attention_flops,
    batch_train_flops,
    peak_flops,
)
from nsa_jax.train.profile import plot_breakdown, step_breakdown, trace_ops  # noqa: E402
from nsa_jax.train.step import Trainer  # noqa: E402


def peak_memory() -> int | None:
    """Largest bytes in use on device 0 so far (None where the backend keeps no count)."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0)) or None


def profile_summary(trace_dir: Path, top: int = 30) -> list[dict[str, Any]]:
    """Device time per op name in the trace under `trace_dir`, the `top` longest, ms summed
    over devices: `[{"op", "ms", "count"}]`. On an accelerator the planes' "XLA Ops" lines
    (its other lines repeat the same kernels per stream and per module); on a host without
    one, every event of the host planes (Python frames included)."""
    from jax.profiler import ProfileData

    totals: dict[str, list[float]] = {}
    for path in sorted(trace_dir.rglob("*.xplane.pb")):
        planes = list(ProfileData.from_file(str(path)).planes)
        # planes of devices that ran XLA ops (libtpu adds an empty one on any host)
        device = [pl for pl in planes if pl.name.startswith("/device:")
                  and any(ln.name == "XLA Ops" for ln in pl.lines)]
        for plane in device or [pl for pl in planes if pl.name.startswith("/host:")]:
            lines = list(plane.lines)
            ops = [ln for ln in lines if ln.name == "XLA Ops"]
            for line in ops if device and ops else lines:
                for ev in line.events:
                    t = totals.setdefault(ev.name, [0.0, 0])
                    t[0] += ev.duration_ns / 1e6
                    t[1] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"op": name, "ms": ms, "count": n} for name, (ms, n) in ranked]


def bench_one(cfg: TrainConfig, length: int, rows: int | None, steps: int, answer: int,
              frame: int, profile: Path | None = None) -> dict[str, Any]:
    mesh = sharding.make_mesh(cfg.mesh)
    shards = sharding.batch_shards(mesh)
    rows = rows or cfg.per_shard_batch * shards
    if rows % shards:
        raise ValueError(f"{rows} rows do not split over {shards} data x fsdp shards")
    cfg = dataclasses.replace(cfg, per_shard_batch=rows // shards)
    t0 = time.perf_counter()
    trainer = Trainer.build(cfg, mesh)
    state = trainer.init_state()
    jax.block_until_ready(state)
    print(f"  T={length}: state ready in {time.perf_counter() - t0:.0f}s", flush=True)
    raws = [synthetic_batch(cfg.model, rows, length, answer_tokens=answer,
                            frame_patches=(frame, frame),
                            pixel_dtype=numpy_dtype(cfg.data.pixel_dtype), seed=i)
            for i in range(cfg.grad_accum)]
    batches = [model_batch(r, cfg.model) for r in raws]
    answer_tokens = sum(b.answer_tokens for b in batches)
    tokens = sum(int((r["segment_ids"] > 0).sum()) for r in raws)
    flops = sum(batch_train_flops(cfg.model, r, b.answer_tokens) for r, b in zip(raws, batches,
                                                                               strict=True))
    on_device = [trainer.put_batch(b) for b in batches]
    # compiled once ahead of time: its memory analysis, and the executable the loop calls
    t0 = time.perf_counter()
    accumulate = trainer.accumulate.lower(
        trainer.abstract_state(), jax.eval_shape(trainer.zero_grads), on_device[0]).compile()
    mem = accumulate.memory_analysis()
    print(f"  T={length}: step compiled in {time.perf_counter() - t0:.0f}s, "
          f"{(mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30:.1f} GiB", flush=True)

    def step(state):
        acc = trainer.zero_grads()
        loss_sum = jnp.zeros((), jnp.float32)
        for b in on_device:
            acc, loss = accumulate(state, acc, b)
            loss_sum = loss_sum + loss
        state, m = trainer.apply(state, acc, jnp.float32(answer_tokens), loss_sum)
        return state, float(m["loss"])  # waits for the step

    losses, times = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        state, loss = step(state)
        losses.append(loss)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times[1:]))
    ops = parts = None
    if profile is not None:  # one more step, traced, after the timed ones
        with jax.profiler.trace(str(profile)):
            state, _ = step(state)
        ops = profile_summary(profile)
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        apply = trainer.apply.lower(trainer.abstract_state(), jax.eval_shape(trainer.zero_grads),
                                    scalar, scalar).compile()
        parts = step_breakdown(trace_ops(profile),
                               {"accumulate": accumulate.as_text(), "apply": apply.as_text()},
                               {"lm_attention": sum(batch_attention_flops(cfg.model, r)
                                                    for r in raws)})
        plot_breakdown(parts, profile.with_name(profile.name.replace("trace_", "profile_")
                                                + ".png"),
                       f"{cfg.name} T={length}: one step by part")
    peak = peak_flops(jax.devices()[0].device_kind, cfg.peak_tflops)
    n = jax.device_count()
    return {
        "length": length, "rows": rows, "grad_accum": cfg.grad_accum, "devices": n,
        "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
        "compile_and_first_step_s": times[0], "step_s": step_s,
        "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s / n,
        "train_tflops_per_step": flops / 1e12,
        "mfu": None if peak is None else flops / (step_s * n * peak),
        "peak_memory_gib": None if (p := peak_memory()) is None else p / 2**30,
        "compiled_step_gib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                              + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**30,
        "losses": losses,
        **({} if ops is None else {"profile_top_ops": ops, "profile": parts}),
    }


def profile_table(rec: dict[str, Any]) -> str:
    """A markdown table of one record's step profile: per part, ms, share of the step's span,
    achieved TFLOP/s (HLO-counted matmuls; the model's count for the attention kernels)."""
    prof = rec["profile"]
    lines = [f"{rec['variant']} T={rec['length']}: span {prof['span_ms']:.1f} ms, busy "
             f"{prof['busy_ms']:.1f} ms, {prof['ops']} ops",
             "| part | ms | % of span | TFLOP/s (HLO) | TFLOP/s (model) |", "|---|---|---|---|---|"]
    for part, p in prof["parts"].items():
        rates = [p.get("tflops_per_s"), p.get("model_tflops_per_s")]
        cells = ["" if r is None else f"{r:.3g}" for r in rates]
        lines.append(f"| {part} | {p['ms']:.1f} | {100 * p['ms'] / max(prof['span_ms'], 1e-9):.1f}"
                     f" | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Tokens/s per device and peak memory against the row length, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for variant in sorted({r["variant"] for r in records}):
        done = sorted((r for r in records if r["variant"] == variant and "tokens_per_s" in r),
                      key=lambda r: r["length"])
        for ax, key in zip(axes, ("tokens_per_s_per_device", "peak_memory_gib"), strict=True):
            pts = [(r["length"], r[key]) for r in done if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=variant)
    for ax, label in zip(axes, ("tokens/s per device", "peak memory per device (GiB)"),
                         strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per row")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(records[0]["config"] if records else "")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(paths: list[Path], out: Path) -> int:
    """One plot and a markdown table of the records of several `results.json`."""
    runs = [json.loads(p.read_text()) for p in paths]
    records = [r for run in runs for r in run["records"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"merged": [str(p) for p in paths], "commands": [run["command"] for run in runs],
         "records": records}, indent=1))
    plot(records, out / "tokens_per_s.png")
    print("| variant | T | devices | step (s) | tokens/s | per device | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(records, key=lambda r: (r["length"], r["variant"])):
        if "error" in r:
            print(f"| {r['variant']} | {r['length']} | | {r['error'][:60]} | | | | |")
            continue
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        print(f"| {r['variant']} | {r['length']} | {r['devices']} | {r['step_s']:.2f} | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | {mfu} | "
              f"{peak} |")
    return 0


def compare(a: Path, b: Path) -> int:
    """Prints the relative loss differences of the matching (variant, length) runs."""
    ra, rb = (json.loads(p.read_text())["records"] for p in (a, b))
    worst = 0.0
    for x in ra:
        for y in rb:
            if (x["variant"], x["length"]) == (y["variant"], y["length"]) and "losses" in x \
                    and "losses" in y:
                rel = max(abs(p - q) / abs(q) for p, q in zip(x["losses"], y["losses"],
                                                             strict=False))
                worst = max(worst, rel)
                print(f"{x['variant']} T={x['length']}: {x['losses']} vs {y['losses']}: "
                      f"max relative difference {rel:.2e}")
    print(f"worst {worst:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="gpu-small")
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--rows", type=int, help="global rows per micro-batch")
    p.add_argument("--mesh", help="override the config's mesh")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--answer", type=int, default=64, help="supervised tokens per row")
    p.add_argument("--frame", type=int, default=16, help="patches per frame side (16: 224 px)")
    p.add_argument("--no-twin", action="store_true", help="skip the dense twin")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny config, T=128")
    p.add_argument("--compare", nargs=2, type=Path, metavar="RESULTS_JSON")
    p.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS_JSON")
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", action="store_true",
                   help="trace one more step per case (OUT/trace_VARIANT_T), record its longest "
                        "ops by device time and its split by part with TFLOP/s "
                        "(nsa_jax.train.profile; OUT/profile_VARIANT_T.png)")
    p.add_argument("--remat-policies", metavar="P1,P2,...",
                   help="time each of these decoder-layer remat policies (ModelConfig."
                        "remat_policy, remat on) as its own case, variant VARIANT/POLICY: "
                        "step time and the compiled step's memory (its peak on the device "
                        "counts from the process's start, so only the first case's is its own)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("--out is required")
    if args.merge:
        return merge(args.merge, args.out)
    overrides = list(args.overrides) + ([f"mesh={args.mesh}"] if args.mesh else [])
    if args.quick:
        args.config, args.lengths, args.steps, args.answer, args.frame = "tiny", "128", 2, 4, 4
        overrides = ["model.text.num_hidden_layers=1", "model.vision.depth=1",
                     "model.vision.fullatt_block_indexes=0", *overrides]
    cfg = load_config(args.config, overrides)
    variants = {"dense" if cfg.model.nsa is None else "hybrid": cfg}
    if not args.no_twin and cfg.model.nsa is not None:
        variants["dense"] = dataclasses.replace(cfg, model=cfg.model.with_attention(nsa=None))
    if args.remat_policies:
        variants = {f"{name}/{policy}": dataclasses.replace(
                        c, model=c.model.replace(remat=True, remat_policy=policy))
                    for name, c in variants.items() for policy in args.remat_policies.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for length in (int(x) for x in args.lengths.split(",")):
        for variant, c in variants.items():
            rec: dict[str, Any] = {"config": cfg.name, "variant": variant, "length": length}
            try:
                tag = variant.replace("/", "-")  # a remat policy's case: hybrid/full
                trace = args.out / f"trace_{tag}_{length}" if args.profile else None
                rec.update(bench_one(c, length, args.rows, args.steps, args.answer, args.frame,
                                     trace))
            except Exception as e:  # noqa: BLE001 - an OOM at one length must not end the sweep
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if rec.get("profile"):
                print(profile_table(rec), flush=True)
            # rewritten after every case: a run stopped by a time limit keeps what it measured
            out = {"command": " ".join(sys.argv), "config": cfg.name, "overrides": overrides,
                   "records": records}
            (args.out / "results.json").write_text(json.dumps(out, indent=1))
            jax.clear_caches()
    plot(records, args.out / "tokens_per_s.png")
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
