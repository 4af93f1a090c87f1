"""Selected-attention forward on one GPU: the Triton lowering vs the Mosaic GPU prototype (issue 6).

For each shape (B=1, D=128, bf16, block 64): `paper64` (64/4 heads, 16 blocks) and `videonsa28`
(28/4 heads, 32 blocks), the selection comes from our GPU pipeline (`nsa_indices`, window 0)
on random q, k, v, padded as `nsa.make_plan` / `nsa.pad_inputs` pad. Then:
1. check at T=2048: every variant's `o` against the Triton `tokens=1` forward (relative L2 below
   `MAX_REL`; a variant that fails is not timed, the others go on);
2. time the selected forward alone (median of `--reps` calls after warm-up, `block_until_ready`)
   at each of `--lengths`, for Triton `tokens=1` (group-centric), Triton `tokens=2, 4` (token
   tiles over the union of their blocks), Mosaic GPU (`selected_mgpu`, the prototype in
   `experiments/mgpu_selected/`; TMA + wgmma, 64-row
   tiles, 3 or 2 K/V slots; q/o rows copied by TMA straight from/to [B, T, Hq, D] when G % 8
   == 0, else gathered into 64-row tiles and scattered back by XLA, `gather_rows`). Each call
   includes its XLA-side layout work (`tile_unions`, the gather / scatter); that work is also
   timed on its own (`*_prep` rows).
Each variant runs under try/except: a failure is printed with its traceback and recorded.
Writes `results.json` and `results.md` under `--out`.

    python3 experiments/bench_selected_backends.py --out /tmp/sel --lengths 32768,131072
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "mgpu_selected"))  # the prototype

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.gpu import nsa as gpu_nsa  # noqa: E402
from pallas_kernels.gpu import nsa_indices  # noqa: E402
from pallas_kernels.gpu.selected import SelParams, selected_forward, tile_unions  # noqa: E402
from pallas_kernels.reference import NSAConfig  # noqa: E402

from selected_mgpu import (  # noqa: E402
    ROWS,
    default_tokens,
    gather_rows,
    scatter_rows,
    selected_forward_mgpu,
)

D = 128
BS = 64
SHAPES = {"paper64": (64, 4, 16), "videonsa28": (28, 4, 32)}  # name: (Hq, Hkv, n)
MAX_REL = 1e-2
CHECK_T = 2048


def log(*a) -> None:
    print(*a, flush=True)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def variants(g: int, interpret: bool) -> dict:
    """name -> fn(q, k, v, seg, idx) -> o."""
    scale = D**-0.5
    tb = default_tokens(g)

    def triton(tokens):
        p = SelParams(block=BS, scale=scale, tokens=tokens, interpret=interpret)
        return lambda q, k, v, seg, idx: selected_forward(q, k, v, seg, idx, p)[0]

    def mosaic(stages, direct=None):
        return lambda q, k, v, seg, idx: selected_forward_mgpu(
            q, k, v, seg, idx, BS, scale, tb, stages=stages, direct=direct,
            interpret=interpret)[0]

    vs = {
        "triton_t1": triton(1),
        "triton_t2": triton(2),
        "triton_t4": triton(4),
        f"mosaic_tb{tb}_s3": mosaic(3),
        f"mosaic_tb{tb}_s2": mosaic(2),
    }
    if g % 8 == 0:  # direct q/o copies by default; also time the XLA gather / scatter path
        vs[f"mosaic_tb{tb}_s3_gather"] = mosaic(3, direct=False)
    return vs


def preps(g: int, hkv: int) -> dict:
    """The XLA-side layout work of the tiled variants, alone."""
    tb = default_tokens(g)

    def gather_prep(q, k, v, seg, idx):
        u = tile_unions(idx, tb)
        og = gather_rows(q, tb, ROWS, hkv)
        return scatter_rows(og, tb, g), u

    return {"triton_t4_prep": lambda q, k, v, seg, idx: tile_unions(idx, 4),
            f"mosaic_tb{tb}_prep": lambda q, k, v, seg, idx: tile_unions(idx, tb),
            f"mosaic_tb{tb}_gather_prep": gather_prep}


def make_inputs(shape: str, t: int, interpret: bool, seed: int = 0):
    hq, hkv, n = SHAPES[shape]
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (1, t, hq, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, t, hkv, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, t, hkv, D), jnp.bfloat16)
    cfg = NSAConfig(block_size=BS, num_selected=n, window=0)
    plan = gpu_nsa.make_plan(1, t, hq, hkv, D, cfg, interpret=interpret)
    _, segp, qp, kp, vp = gpu_nsa.pad_inputs(plan, q, k, v, None)
    idx = jax.jit(functools.partial(nsa_indices, cfg=cfg, interpret=interpret))(q, k, v)
    idx = gpu_nsa.pad_axis(idx, 1, plan.tp, value=-1)
    return jax.block_until_ready((qp, kp, vp, segp, idx))


def time_fn(fn, args, reps: int) -> tuple[float, float]:
    """`(compile_and_first_call_s, median_ms)`."""
    f = jax.jit(fn)
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    first = time.perf_counter() - t0
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", default="",
                    help="regex: run only the variants / prep rows whose name matches "
                         "(triton_t1, the check's reference, always runs)")
    ap.add_argument("--check-len", type=int, default=CHECK_T)
    ap.add_argument("--interpret", action="store_true",
                    help="CPU smoke test of this script (interpret mode; tiny --lengths)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    log(f"jax {jax.__version__}, devices {jax.devices()}")
    records, checks, t_start = [], [], time.perf_counter()

    for shape in args.shapes.split(","):
        hq, hkv, n = SHAPES[shape]
        g = hq // hkv
        vs = {k2: f for k2, f in variants(g, args.interpret).items()
              if k2 == "triton_t1" or re.search(args.only, k2)}
        # 1. correctness at T=2048 against the Triton tokens=1 forward
        ok = {}
        try:
            xs = make_inputs(shape, args.check_len, args.interpret)
            o_ref = np.asarray(jax.jit(vs["triton_t1"])(*xs), np.float32)
            ok["triton_t1"] = True
        except Exception:
            traceback.print_exc()
            log(f"[{shape}] the Triton tokens=1 reference failed; skipping the shape")
            continue
        for name, fn in vs.items():
            if name == "triton_t1":
                continue
            try:
                err = rel_err(np.asarray(jax.jit(fn)(*xs), np.float32), o_ref)
                ok[name] = err < MAX_REL
                checks.append(dict(shape=shape, method=name, t=args.check_len, rel_err=err,
                                   ok=ok[name]))
                log(f"[{shape}] check {name}: rel L2 vs triton_t1 = {err:.2e} "
                    f"{'ok' if ok[name] else 'FAILED (not timed)'}")
            except Exception as e:
                traceback.print_exc()
                ok[name] = False
                checks.append(dict(shape=shape, method=name, t=args.check_len, rel_err=None,
                                   ok=False, error=f"{type(e).__name__}: {e}"[:2000]))
                log(f"[{shape}] check {name}: ERROR {type(e).__name__} (not timed)")
        del xs
        # 2. timings
        for t in lengths:
            try:
                xs = make_inputs(shape, t, args.interpret)
            except Exception:
                traceback.print_exc()
                log(f"[{shape}] T={t}: selection failed; skipping this length")
                continue
            tb = default_tokens(g)
            for tt in (2, 4, tb):
                cnt = np.asarray(tile_unions(xs[4], tt)[2], np.float64)
                log(f"[{shape}] T={t}: mean union of {tt} tokens = {cnt.mean():.1f} blocks "
                    f"(of {tt * n} chosen)")
            flops = 4.0 * t * hq * n * BS * D  # QK^T and PV over the chosen blocks
            todo = [(k2, f) for k2, f in vs.items() if ok.get(k2)]
            todo += [(k2, f) for k2, f in preps(g, hkv).items() if re.search(args.only, k2)]
            for name, fn in todo:
                rec = dict(shape=shape, method=name, t=t, ms=None, tflops=None,
                           compile_s=None, note="")
                try:
                    first, ms = time_fn(fn, xs, args.reps)
                    rec.update(ms=ms, compile_s=first)
                    if not name.endswith("_prep"):
                        rec["tflops"] = flops / ms / 1e9
                    log(f"[{shape}] T={t} {name}: {ms:.3f} ms (first call {first:.1f} s)")
                except Exception as e:
                    traceback.print_exc()
                    rec["note"] = f"{type(e).__name__}: {e}"[:2000]
                    log(f"[{shape}] T={t} {name}: ERROR {type(e).__name__}")
                records.append(rec)
            del xs
            log(f"elapsed {time.perf_counter() - t_start:.0f} s")

    result = dict(jax=jax.__version__, device=str(jax.devices()[0]), d=D, block=BS,
                  checks=checks, records=records)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"Selected-attention forward, {jax.devices()[0].device_kind}, jax {jax.__version__}"
             f" (B=1, D={D}, bf16, block {BS}; median of {args.reps})", "",
             "| shape | T | method | ms | TFLOP/s | first call s | note |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        tf = f"{r['tflops']:.0f}" if r["tflops"] is not None else "-"
        cs = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        lines.append(f"| {r['shape']} | {r['t']} | {r['method']} | {ms} | {tf} | {cs} | "
                     f"{r['note'][:80]} |")
    lines += ["", f"Checks at T={args.check_len} (relative L2 of o vs triton_t1, "
              f"bound {MAX_REL}):", ""]
    lines += [f"- {c['shape']} {c['method']}: {c['rel_err']} {'ok' if c['ok'] else 'FAILED'}"
              for c in checks]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    log(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
