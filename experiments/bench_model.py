"""Long-context model benchmark: the hybrid VideoNSA model against its dense twin, on one GPU.

Two modes (both by default; `--modes model,layer`):
- `model`: forward+backward (loss and gradients of every parameter, no optimizer) of the
  Qwen2.5-VL-7B shape with random weights, bf16, remat per decoder layer and vision block
  and the vision tower recomputed whole (`--vision-remat tower`), layers scanned
  (`scan_layers`):
  the vision tower and the 28-layer language model on one sample whose tokens are ~97% video
  (four videos of 448 x 448 frames, text before, between and after them). `hybrid` is the
  `videonsa-7b-clean` preset (VideoNSA's defaults, NSA in every layer); `dense` its twin with
  NSA off (cuDNN attention). The loss reads the final hidden states (`return_hidden`) and
  computes the cross-entropy in chunks of `LOSS_CHUNK` tokens (the training loss,
  `train.loss.chunked_cross_entropy`), so no `[T, vocab]` logits
  exist. Also timed (in the dense case): the vision tower alone, forward+backward, for its
  share of the step. Weights are random (the trainer's `init_params`, `random_model`).
- `layer`: one language-model layer's attention, bf16 forward+backward at 8K-128K with the
  7B's heads (28 query / 4 KV, D = 128) and ~97% video rows: cuDNN dense, the routed hybrid
  layer (NSA on the kernels + gathered text rows), NSA alone and the text rows alone, so
  the text rows' share of a hybrid layer is measured.

Each (mode, model, length) runs in its own subprocess, so a failure (out of memory) is a
recorded result, not the end of the sweep, and peak memory is the device's
`peak_bytes_in_use` for that case alone. One progress line per step. Each case writes its
own JSON under `--out`; after each case `results.json`, `results.md` and `model.png` /
`layer.png` (time and memory against length) are redrawn from every case file there, so
separate calls (`--modes layer`, then `--modes model --models hybrid`, ...) add up.

    python experiments/bench_model.py --out experiments/results/bench_model_h200_s2/model \\
        --modes model
    python experiments/bench_model.py --quick --out /tmp/bench_model   # CPU, tiny, minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# A 128K step needs nearly all of an H200. JAX's default BFC allocator stops at 75% of the
# device and keeps the regions it freed apart: under it a 104 GiB program failed on the
# 140 GiB H200 (7B hybrid, 64K) while CUDA's stream-ordered allocator ran 119 GiB (128K).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nsa_jax.attention.dense import dense_attention  # noqa: E402
from nsa_jax.attention.hybrid import (  # noqa: E402
    gate_values,
    hybrid_attention,
    text_attention,
    text_row_bucket,
)
from nsa_jax.attention.nsa import nsa_attention  # noqa: E402
from nsa_jax.config import ModelConfig, preset  # noqa: E402
from nsa_jax.model.inputs import prepare  # noqa: E402
from nsa_jax.model.vlm import Qwen25VL  # noqa: E402
from nsa_jax.train.loss import chunked_cross_entropy  # noqa: E402
from nsa_jax.train.step import ModelDef, init_params  # noqa: E402

LOSS_CHUNK = 4096  # tokens per step of the chunked cross-entropy
FULL = {"model": (32768, 65536, 131072), "layer": (8192, 16384, 32768, 65536, 131072)}
QUICK = {"model": (192, 384), "layer": (256, 512)}
VIDEOS = 4  # videos per sample, text before, between and after them


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str  # "model" or "layer"
    model: str  # model: "hybrid" / "dense"; layer: "all" (every method of one length)
    tokens: int
    quick: bool
    iters: int
    vision_remat: str = "block"  # model mode: ModelConfig.vision_remat


# --------------------------------------------------------------------------- inputs


def model_config(kind: str, quick: bool, vision_remat: str = "block") -> ModelConfig:
    """The benchmarked config: the 7B shape (or, `quick`, the tiny preset with NSA blocks of
    16), remat (the vision tower's by `vision_remat`) and scanned layers on, NSA on for
    "hybrid" and off for "dense"."""
    if quick:
        base = preset("tiny")
        nsa = dataclasses.replace(preset("videonsa-7b-clean").nsa, block_size=16,
                                  num_selected=4, window=32)
        cfg = base.with_attention(nsa=nsa)
    else:
        cfg = preset("videonsa-7b-clean")
    return cfg.replace(remat=True, scan_layers=True, vision_remat=vision_remat).with_attention(
        nsa=cfg.nsa if kind == "hybrid" else None)


def video_prompt(cfg: ModelConfig, tokens: int, quick: bool) -> dict[str, np.ndarray]:
    """Token ids and grids of one sample of about `tokens` tokens, ~97% video: `VIDEOS`
    videos of (t, s, s) patches (s = 32, 448-pixel frames; 8 when `quick`) with text runs
    before, between and after them. Returns input_ids `[1, T]`, video_grid_thw `[V, 3]`."""
    side = 8 if quick else 32
    per_t = side * side // cfg.vision.spatial_merge_size**2  # tokens per temporal patch
    t_total = max(VIDEOS, int(tokens * 0.97) // per_t)
    ts = [t_total // VIDEOS + (i < t_total % VIDEOS) for i in range(VIDEOS)]
    text = tokens - t_total * per_t
    gaps = [text // (VIDEOS + 1) + (i < text % (VIDEOS + 1)) for i in range(VIDEOS + 1)]
    rng = np.random.default_rng(0)
    ids: list[int] = []
    for i in range(VIDEOS + 1):
        ids += rng.integers(0, cfg.vision_start_token_id - 5, gaps[i]).tolist()
        if i < VIDEOS:
            ids += [cfg.video_token_id] * (ts[i] * per_t)
    return {
        "input_ids": np.asarray([ids], np.int32),
        "video_grid_thw": np.asarray([(t, side, side) for t in ts], np.int64),
    }


# --------------------------------------------------------------------------- timing


def timed(fn, args, iters: int, record: dict | None = None) -> dict:
    """Compiles `fn` (jitted) on `args`, runs it once, then `iters` times: seconds. The
    compile time and XLA's memory analysis go into `record` (returned) before the first run,
    so a run that fails (out of memory) still reports what it needed."""
    record = {} if record is None else record
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    record["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem:
        record["temp_bytes"] = int(mem.temp_size_in_bytes)
        record["argument_bytes"] = int(mem.argument_size_in_bytes)
        record["output_bytes"] = int(mem.output_size_in_bytes)
    print(f"  compiled in {record['compile_s']:.0f}s, temp {fmt_bytes(record.get('temp_bytes'))}"
          f", arguments {fmt_bytes(record.get('argument_bytes'))}, outputs "
          f"{fmt_bytes(record.get('output_bytes'))}", flush=True)
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    record["ms"] = 1e3 * float(np.median(times))
    return record


def peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def random_model(cfg: ModelConfig, dtype: jnp.dtype) -> Qwen25VL:
    """The model with random weights from the trainer's `init_params` (a few dozen small
    compiled fills, whatever the depth)."""
    md = ModelDef.of(cfg, dtype, dtype)
    return md.merge(init_params(md, seed=0))


def run_model(case: Case, out: dict) -> dict:
    """Forward+backward of the whole model, and of the vision tower alone, into `out`."""
    cfg = model_config(case.model, case.quick, case.vision_remat)
    dtype = jnp.float32 if case.quick else jnp.bfloat16
    t0 = time.perf_counter()
    model = random_model(cfg, dtype)
    print(f"  random weights {time.perf_counter() - t0:.1f}s", flush=True)
    prompt = video_prompt(cfg, case.tokens, case.quick)
    grid = prompt["video_grid_thw"]
    n_patches = int(grid.prod(-1).sum())
    prepared = prepare(model.cfg, prompt["input_ids"], video_grid_thw=grid,
                             pixel_values_videos=np.zeros((1, 1), np.float32))
    pixels = jax.random.normal(jax.random.key(1), (n_patches, cfg.vision.patch_dim), dtype)
    videos = dataclasses.replace(prepared.pop("videos"), pixels=pixels)
    text_rows = prepared.pop("text_rows")
    labels = jnp.asarray(np.roll(prompt["input_ids"], -1, axis=1))
    graph, state = nnx.split(model)
    print(f"  init {time.perf_counter() - t0:.1f}s, {n_patches} patches, text_rows "
          f"{text_rows}", flush=True)

    # the token arrays are arguments, not closed-over constants: XLA would constant-fold
    # every position-dependent computation on them (minutes at 32K tokens)
    @jax.jit
    def step(state: nnx.State, videos, prepared: dict) -> tuple[jax.Array, nnx.State]:
        def loss(state: nnx.State) -> jax.Array:
            m = nnx.merge(graph, state)
            h = m.forward(**prepared, videos=videos, text_rows=text_rows, return_hidden=True)
            weights = jnp.full(labels.shape, 1.0 / labels.size, jnp.float32)
            return chunked_cross_entropy(h, m.output_kernel(), labels, weights, LOSS_CHUNK)

        return jax.value_and_grad(loss)(state)

    @jax.jit
    def vision_step(state: nnx.State, videos) -> tuple[jax.Array, nnx.State]:
        def loss(state: nnx.State) -> jax.Array:
            feats = nnx.merge(graph, state).visual(videos.pixels, videos.inputs)
            return jnp.mean(feats.astype(jnp.float32) ** 2)

        return jax.value_and_grad(loss)(state)

    out.update({"tokens": int(prompt["input_ids"].shape[1]), "patches": n_patches,
                "text_rows": int((prompt["input_ids"] != cfg.video_token_id).sum()),
                "text_row_slots": text_rows, "step": {}})
    timed(step, (state, videos, prepared), case.iters, out["step"])
    out["peak_bytes"] = peak_bytes()
    print(f"  step {out['step']['ms']:.0f} ms (compile {out['step']['compile_s']:.0f}s), "
          f"peak {fmt_bytes(out['peak_bytes'])}", flush=True)
    if case.model == "dense":  # the same tower in both models: timed once per length
        out["vision"] = timed(vision_step, (state, videos), case.iters)
        out["vision_share"] = out["vision"]["ms"] / out["step"]["ms"]
        print(f"  vision tower {out['vision']['ms']:.0f} ms ({100 * out['vision_share']:.0f}% "
              "of the dense step)", flush=True)
    return out


def layer_inputs(t: int, quick: bool):
    """bf16 (f32 when `quick`) q `[1, T, 28, 128]`, k, v `[1, T, 4, 128]`, gate logits, and
    the video rows of `video_prompt`'s layout (~97% video)."""
    cfg = preset("videonsa-7b-clean")
    hq, hkv, d = (4, 2, 16) if quick else (28, 4, 128)
    dtype = jnp.float32 if quick else jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (1, t, hq, d), dtype)
    k = jax.random.normal(keys[1], (1, t, hkv, d), dtype)
    v = jax.random.normal(keys[2], (1, t, hkv, d), dtype)
    g = jax.random.normal(keys[3], (1, t, hq, 3), dtype)
    ids = video_prompt(cfg, t, quick)["input_ids"]
    return q, k, v, g, jnp.asarray(ids == cfg.video_token_id)


def run_layer(case: Case, out: dict) -> dict:
    """One layer's attention, forward+backward, by method; each method in its own try."""
    t = case.tokens
    attn = model_config("hybrid", case.quick).attention
    nsa_cfg = attn.nsa
    q, k, v, g, video = layer_inputs(t, case.quick)
    n_text = int((~video).sum())
    rows = text_row_bucket(n_text, t)
    cot = jax.random.normal(jax.random.key(9), q.shape, q.dtype)
    methods = {
        "dense": lambda q, k, v, g: dense_attention(q, k, v),
        "hybrid": lambda q, k, v, g: hybrid_attention(q, k, v, g, video, attn, text_rows=rows),
        "nsa": lambda q, k, v, g: nsa_attention(q, k, v, gate_values(g, 0.3), nsa_cfg),
        "text_rows": lambda q, k, v, g: text_attention(q, k, v, ~video, rows, None),
    }
    out.update({"tokens": t, "text_rows": n_text, "text_row_slots": rows, "methods": {}})
    for name, fn in methods.items():
        def loss(q, k, v, g, fn=fn):
            return jnp.sum(fn(q, k, v, g).astype(jnp.float32) * cot.astype(jnp.float32))

        try:
            r = timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (q, k, v, g), case.iters)
        except Exception as e:  # noqa: BLE001 (out of memory and the like are results)
            r = {"error": error_text(e)}
        out["methods"][name] = r
        print(f"  {name}: " + (f"{r['ms']:.2f} ms" if "ms" in r else r["error"]), flush=True)
    m = out["methods"]
    if "ms" in m["hybrid"] and "ms" in m["nsa"]:
        out["text_share"] = (m["hybrid"]["ms"] - m["nsa"]["ms"]) / m["hybrid"]["ms"]
    return out


# --------------------------------------------------------------------------- driver


def error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return ("OOM: " if oom else "") + text.splitlines()[0][:300]


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def run_one(case: Case) -> dict:
    """Runs one case in this process; any failure becomes the result's `error`."""
    result: dict = {}
    try:
        (run_model if case.mode == "model" else run_layer)(case, result)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        result["error"] = error_text(e)
    return {**dataclasses.asdict(case), **result}


def case_path(case: Case, out: Path) -> Path:
    return out / f"{case.mode}_{case.model}_{case.tokens}.json"


def run_subprocess(case: Case, out: Path, timeout: float) -> None:
    """Runs `case` in a fresh Python (its own device memory and peak); its result file says
    how it ended, crash and timeout included."""
    path = case_path(case, out)
    path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--one", json.dumps(dataclasses.asdict(case)),
           "--out", str(out)]
    try:
        proc = subprocess.run(cmd, timeout=timeout, check=False)
        error = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timeout after {timeout:.0f}s"
    if not path.exists():
        path.write_text(json.dumps({**dataclasses.asdict(case), "error": error}))


def case_files(out: Path) -> list[dict]:
    """Every case result under `out` (this call's and earlier calls'), by mode and length."""
    results = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "results.json"]
    return sorted(results, key=lambda r: (r["mode"], r["tokens"], r["model"]))


def report(results: list[dict], out: Path) -> None:
    """results.json, results.md and the plots."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| mode | model | tokens | fwd+bwd ms | memory | vision share | text share | note |",
             "|---|---|---|---|---|---|---|---|"]

    def num(x: float | None, spec: str) -> str:
        return "" if x is None else format(x, spec)

    for r in results:
        if r["mode"] == "model":
            share = r.get("vision_share")
            step = r.get("step", {})
            compiled = sum(step.get(k, 0) for k in ("temp_bytes", "argument_bytes",
                                                    "output_bytes")) or None
            lines.append(
                f"| model | {r['model']} | {r['tokens']} | {num(step.get('ms'), '.0f')} | "
                f"{fmt_bytes(r.get('peak_bytes'))} peak, {fmt_bytes(compiled)} compiled | "
                f"{'' if share is None else format(share, '.0%')} | | "
                f"vision remat {r.get('vision_remat', 'block')}. {r.get('error', '')} |")
            continue
        for name, m in r.get("methods", {}).items():
            share = r.get("text_share") if name == "hybrid" else None
            lines.append(
                f"| layer | {name} | {r['tokens']} | {num(m.get('ms'), '.2f')} | "
                f"{fmt_bytes(m.get('temp_bytes'))} temp | | "
                f"{'' if share is None else format(share, '.0%')} | "
                f"{m.get('error', '')} |")
        if "error" in r:
            lines.append(f"| layer | | {r['tokens']} | | | | | {r['error']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(results, out)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for mode in ("model", "layer"):
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        series: dict[str, list[tuple[int, float, float | None]]] = {}
        for r in rows:
            if mode == "model":
                if "ms" in r.get("step", {}):
                    series.setdefault(r["model"], []).append(
                        (r["tokens"], r["step"]["ms"], r.get("peak_bytes")))
            else:
                for name, m in r.get("methods", {}).items():
                    if "ms" in m:
                        series.setdefault(name, []).append(
                            (r["tokens"], m["ms"], m.get("temp_bytes")))
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
        for name, pts in sorted(series.items()):
            pts.sort()
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], "o-", label=name)
            mem = [(p[0], p[2] / 2**30) for p in pts if p[2]]
            if mem:
                ax_m.plot(*zip(*mem, strict=True), "o-", label=name)
        for ax, ylabel in ((ax_t, "forward+backward ms"),
                           (ax_m, "peak GiB" if mode == "model" else "compiled temp GiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"{mode}: {jax.devices()[0].device_kind}")
        fig.tight_layout()
        fig.savefig(out / f"{mode}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--quick", action="store_true", help="tiny config on any backend (tests)")
    ap.add_argument("--modes", default="model,layer")
    ap.add_argument("--models", default="hybrid,dense", help="model mode: hybrid,dense")
    ap.add_argument("--model-lengths", default=None, help="comma list (default 32K,64K,128K)")
    ap.add_argument("--layer-lengths", default=None, help="comma list (default 8K..128K)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs (default 2; quick 1)")
    ap.add_argument("--vision-remat", default="tower", choices=("block", "tower"),
                    help="model mode: how the vision tower is rematerialised")
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per case")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a case, run here
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        case = Case(**json.loads(args.one))
        case_path(case, out).write_text(json.dumps(run_one(case)))
        return 0
    lengths = QUICK if args.quick else FULL
    if args.model_lengths:
        lengths = {**lengths, "model": tuple(int(x) for x in args.model_lengths.split(","))}
    if args.layer_lengths:
        lengths = {**lengths, "layer": tuple(int(x) for x in args.layer_lengths.split(","))}
    iters = args.iters or (1 if args.quick else 2)
    cases = []
    for mode in args.modes.split(","):
        models = args.models.split(",") if mode == "model" else ["all"]
        cases += [Case(mode, m, t, args.quick, iters, args.vision_remat)
                  for t in lengths[mode] for m in models]
    print(f"{len(cases)} cases on {jax.devices()[0].device_kind}", flush=True)
    t_start = time.perf_counter()
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case.mode} {case.model} {case.tokens} tokens "
              f"({time.perf_counter() - t_start:.0f}s)", flush=True)
        run_subprocess(case, out, args.timeout)
        report(case_files(out), out)
    print(f"done in {time.perf_counter() - t_start:.0f}s: {out / 'results.md'}", flush=True)
    print((out / "results.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
