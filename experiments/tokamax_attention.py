"""tokamax's Mosaic GPU attention (FlashAttention-3 style, sm90) beside cuDNN and our kernels.

Issue 30 item 4: is `tokamax.dot_product_attention(implementation="mosaic")` faster than cuDNN
as the dense peer, and than our Triton banded kernel as NSA's sliding-window branch
(`local_window_size=(w - 1, 0)`: the query and `w - 1` tokens before it)? Times forward and
forward+backward (bf16, B=1, D=128, Qwen2.5-VL-7B's 28 query / 4 KV heads) at each length,
after checking tokamax's output and gradients against cuDNN's (dense) and ours (window) on the
same inputs. Writes `results.json` under `--out`.

tokamax is not a dependency: on the GPU machine it is installed from wheels for this run. Its
package imports `xprof` (a profiler front end, 30+ MB with its own dependencies) at import time
for benchmarking helpers this script does not call; a stand-in module takes its place.

    python experiments/tokamax_attention.py --out /tmp/tk --lengths 32768,131072
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_attention import D, inputs, loss_grad, rel_err, time_jax, timed  # noqa: E402

from pallas_kernels.gpu import nsa as gpu_nsa  # noqa: E402
from pallas_kernels.gpu.banded import banded_attention  # noqa: E402
from pallas_kernels.reference import NSAConfig  # noqa: E402


def import_tokamax():
    if "xprof" not in sys.modules:
        tools = types.ModuleType("xprof.cli.tools")
        tools.get_kernel_stats_tool = None
        for name, mod in (("xprof", types.ModuleType("xprof")),
                          ("xprof.cli", types.ModuleType("xprof.cli")),
                          ("xprof.cli.tools", tools)):
            sys.modules[name] = mod
    import tokamax

    return tokamax


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tokamax_out")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--heads", default="28,4")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tk = import_tokamax()
    hq, hkv = (int(x) for x in args.heads.split(","))
    w = args.window
    meta = {"device": str(jax.devices()[0]), "jax": jax.__version__,
            "tokamax": getattr(tk, "__version__", "?"), "command": " ".join(sys.argv)}
    print(meta, flush=True)

    def tokamax_fn(window: int | None):
        def fn(q, k, v):
            return tk.dot_product_attention(
                q, k, v, is_causal=True, implementation="mosaic",
                local_window_size=None if window is None else (window - 1, 0))
        return fn

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def ours_window(t: int):
        plan = gpu_nsa.make_plan(1, t, hq, hkv, D, NSAConfig(window=w))
        seg = jnp.ones((1, t), jnp.int32)
        return lambda q, k, v: banded_attention(q, k, v, seg, seg, plan.win)[0]

    checks, records = [], []
    tc = 4096
    q, k, v, _, ct = inputs(jax.random.key(0), tc, hq, hkv, jnp.bfloat16)
    for name, mine, theirs in (("dense", tokamax_fn(None), cudnn),
                               (f"window {w}", tokamax_fn(w), ours_window(tc))):
        try:
            row = {"case": name, "t": tc, "o": rel_err(jax.jit(mine)(q, k, v),
                                                        jax.jit(theirs)(q, k, v))}
            ga = jax.jit(loss_grad(mine, (0, 1, 2)))(q, k, v, ct)
            gb = jax.jit(loss_grad(theirs, (0, 1, 2)))(q, k, v, ct)
            row.update({n: rel_err(a, b) for n, a, b in zip(("dq", "dk", "dv"), ga, gb,
                                                               strict=True)})
        except Exception as e:  # noqa: BLE001
            row = {"case": name, "error": repr(e)[:400]}
        checks.append(row)
        print("check", row, flush=True)

    for t in (int(x) for x in args.lengths.split(",")):
        q, k, v, _, ct = inputs(jax.random.key(t), t, hq, hkv, jnp.bfloat16)
        methods = {"cudnn dense": cudnn, "tokamax mosaic dense": tokamax_fn(None),
                   f"ours banded window {w}": ours_window(t),
                   f"tokamax mosaic window {w}": tokamax_fn(w)}
        for name, fn in methods.items():
            method = f"{name} ({hq}/{hkv})"
            timed(records, method, "peer", t, "fwd",
                  lambda fn=fn, a=(q, k, v): time_jax(jax.jit(fn), a))
            timed(records, method, "peer", t, "fwd+bwd",
                  lambda fn=fn, a=(q, k, v, ct): time_jax(jax.jit(loss_grad(fn, (0, 1, 2))), a))
        (out / "results.json").write_text(json.dumps(
            {"meta": meta, "checks": checks,
             "records": [dataclasses.asdict(r) for r in records]}, indent=1))
    for r in records:
        print(f"{r.t:>7} {r.method:<40} {r.mode:<8} {r.ms if r.ms is None else round(r.ms, 2)}"
              f" {r.note}")


if __name__ == "__main__":
    main()
