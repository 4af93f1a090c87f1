"""NSA attention benchmark on one GPU: our Pallas kernels vs cuDNN dense vs fla-core's Triton NSA.

First checks correctness against the pure-JAX reference at a small size (bf16 and f32, outputs
and gradients), then times forward and forward+backward at each length (B=1, D=128, bf16):
- ours (`pallas_kernels.gpu.nsa_attention`) in VideoNSA's setting (28/4 heads, 32 blocks,
  window 256) and the NSA paper's (64/4 heads, 16 blocks, window 512), each also with window 0;
- dense causal attention, `jax.nn.dot_product_attention(implementation="cudnn")`;
- fla-core `parallel_nsa` (PyTorch + Triton) with window 0 on 64/4 heads (the 28-head model
  runs there only padded to 64 heads, as VideoNSA does).
Times are medians of several calls after warm-up (`block_until_ready` for JAX,
`triton.testing.do_bench` for PyTorch). Achieved TFLOP/s count the matmul FLOPs NSA needs
(`flops_nsa`; forward+backward = 3.5x forward), not what a kernel recomputes.

Writes `results.json`, `results.md` and `times.png` under `--out`.

    python experiments/bench_attention.py --out /tmp/bench --lengths 8192,16384,32768,65536,131072
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nsa_jax.attention.flops import flops_dense, flops_nsa  # noqa: E402
from nsa_jax.train.config import from_dict  # noqa: E402
from pallas_kernels import reference as ref  # noqa: E402
from pallas_kernels.gpu import nsa as gpu_nsa  # noqa: E402
from pallas_kernels.gpu import nsa_attention, selected_attention  # noqa: E402
from pallas_kernels.gpu.selected import tile_unions  # noqa: E402
from pallas_kernels.tiles import BlockSizes  # noqa: E402

D = 128
SHAPES = {  # name: (Hq, Hkv, config, peer heads)
    "paper64": (64, 4, ref.NSAConfig(block_size=64, num_selected=16, window=512), 64),
    "videonsa28": (28, 4, ref.NSAConfig(block_size=64, num_selected=32, window=256), 64),
}


@dataclasses.dataclass
class Record:
    method: str
    shape: str
    t: int
    mode: str  # "fwd" or "fwd+bwd"
    ms: float | None
    tflops: float | None = None
    note: str = ""
    compile_s: float | None = None  # first call (compilation and one run), JAX methods only


# relative L2 error bounds of the check: bf16 inputs round each product's operands; f32 runs at
# full precision on both sides, so only summation order (and rare top-n flips) separate them
MAX_REL_ERR = {"bfloat16": 2e-2, "float32": 1e-3}
MIN_SEL_AGREE = 0.97


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# "smooth" inputs: queries and keys drift over `SMOOTH_SPAN` tokens, as neighbouring patches
# of a video do, so adjacent tokens select overlapping blocks ("random": independent tokens,
# whose selections share only the forced blocks)
INPUTS = ("random", "smooth")
SMOOTH_SPAN = 64


def drifting(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """`[1, T, H, D]` normal rows: a random direction per `SMOOTH_SPAN` tokens, linearly
    interpolated between spans, plus half as much fresh noise per token."""
    k1, k2 = jax.random.split(key)
    t = shape[1]
    n = t // SMOOTH_SPAN + 2
    anchors = jax.random.normal(k1, (shape[0], n, *shape[2:]), jnp.float32)
    pos = jnp.arange(t) / SMOOTH_SPAN
    lo, w = jnp.floor(pos).astype(jnp.int32), (pos % 1.0)[None, :, None, None]
    x = anchors[:, lo] * (1 - w) + anchors[:, lo + 1] * w
    return (x + 0.5 * jax.random.normal(k2, shape, jnp.float32)).astype(dtype)


def inputs(key: jax.Array, t: int, hq: int, hkv: int, dtype,
           kind: str = "random") -> tuple[jax.Array, ...]:
    ks = jax.random.split(key, 5)
    draw = jax.random.normal if kind == "random" else drifting
    q = draw(ks[0], (1, t, hq, D), dtype)
    k = draw(ks[1], (1, t, hkv, D), dtype)
    v = jax.random.normal(ks[2], (1, t, hkv, D), dtype)
    gates = jax.nn.sigmoid(jax.random.normal(ks[3], (1, t, hq, 3), jnp.float32)).astype(dtype)
    ct = jax.random.normal(ks[4], (1, t, hq, D), dtype)
    return q, k, v, gates, ct


def loss_grad(fn: Callable, argnums: tuple[int, ...] = (0, 1, 2, 3)) -> Callable:
    """`(*args, ct) -> grads of sum(fn(*args) * ct)` w.r.t. `args[i]` for i in `argnums`
    (by default q, k, v, gates)."""

    def loss(*a):
        return (fn(*a[:-1]).astype(jnp.float32) * a[-1].astype(jnp.float32)).sum()

    return jax.grad(loss, argnums=argnums)


def timed(out: list[Record], method: str, shape: str, t: int, mode: str,
          run: Callable[[], tuple[float, float]], flops: float | None = None) -> None:
    """Times `run` (`(milliseconds, compile seconds)`) into a `Record`; a failure is recorded
    with its error, and the sweep goes on."""
    try:
        ms, compile_s = run()
        rec = Record(method, shape, t, mode, ms, None if flops is None else flops / ms / 1e9,
                     compile_s=round(compile_s, 1))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rec = Record(method, shape, t, mode, None, note=repr(e)[:300])
    out.append(rec)
    print(rec, flush=True)


# --------------------------------------------------------------------------- correctness


def check(t: int = 1024, seed: int = 0) -> list[dict]:
    """Ours vs the reference (f32 maths at full precision on the same inputs), both dtypes.

    `sel_agree` is the fraction of selected-block slots on which our top-n equals the
    reference's: near-ties in block importance may flip a choice under bf16 rounding, and a
    flipped block moves that token's output by far more than rounding does.
    """
    rows = []
    cfg = ref.NSAConfig(block_size=64, num_selected=8, window=128)
    for hq, hkv in ((28, 4), (64, 4)):
        for dtype in (jnp.bfloat16, jnp.float32):
            q, k, v, g, ct = inputs(jax.random.key(seed + hq), t, hq, hkv, dtype)
            seg = jnp.ones((1, t), jnp.int32).at[:, t - t // 3:].set(2).at[:, t - 17:].set(0)
            ours = jax.jit(lambda *a, seg=seg: nsa_attention(*a, cfg, segment_ids=seg))
            refn = jax.jit(lambda *a, seg=seg: ref.nsa_reference(
                *(x.astype(jnp.float32) for x in a), cfg, segment_ids=seg))
            with jax.default_matmul_precision("highest"):
                o2 = refn(q, k, v, g)
                g2 = jax.jit(loss_grad(refn))(q, k, v, g, ct)
                q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
                kc, _ = ref.compress_kv(k32, k32, cfg)
                _, lse = ref.compressed_attention(q32, kc, kc, cfg, segment_ids=seg)
                idx_ref = ref.select_blocks(q32, kc, lse, cfg, segment_ids=seg)
            o1 = ours(q, k, v, g)
            g1 = jax.jit(loss_grad(ours))(q, k, v, g, ct)
            idx = gpu_nsa.nsa_indices(q, k, v, cfg, segment_ids=seg)
            live = np.asarray(seg)[:, :, None, None] > 0
            same = np.sort(np.asarray(idx), -1) == np.sort(np.asarray(idx_ref), -1)
            row = {"hq": hq, "hkv": hkv, "dtype": jnp.dtype(dtype).name, "t": t,
                   "o": rel_err(o1, o2), "finite": bool(jnp.isfinite(o1).all()),
                   "sel_agree": float(same[np.broadcast_to(live, same.shape)].mean())}
            for name, a, b in zip(("dq", "dk", "dv", "dgates"), g1, g2, strict=True):
                row[name] = rel_err(a, b)
                row["finite"] &= bool(jnp.isfinite(a).all())
            rows.append(row)
            print("check", row, flush=True)
    bad = [r for r in rows if not r["finite"] or r["sel_agree"] < MIN_SEL_AGREE
           or max(r[x] for x in ("o", "dq", "dk", "dv", "dgates")) > MAX_REL_ERR[r["dtype"]]]
    if bad:  # a wrong kernel is not worth timing
        raise SystemExit(f"correctness check failed: {bad}")
    return rows


# --------------------------------------------------------------------------- timing


def time_jax(fn: Callable, args: tuple, budget_s: float = 3.0) -> tuple[float, float]:
    """`(median milliseconds, seconds of the first call)` of `fn(*args)`."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    reps = int(max(3, min(20, budget_s / max(first, 1e-4))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts), compile_s


def bench_fla(lengths: list[int], out: list[Record]) -> None:
    """fla-core parallel_nsa, window 0, 64/4 heads, 16 and 32 blocks."""
    try:
        import torch
        import triton
        from fla.ops.nsa.parallel import parallel_nsa
    except Exception as e:  # noqa: BLE001
        print("fla unavailable:", e, flush=True)
        return
    for t in lengths:
        for shape, (_, hkv, cfg, peer_hq) in SHAPES.items():
            try:
                gen = torch.Generator(device="cuda").manual_seed(t)

                def rnd(*s, gen=gen):
                    return torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)

                q, k, v = rnd(1, t, peer_hq, D), rnd(1, t, hkv, D), rnd(1, t, hkv, D)
                gc, gs = (torch.sigmoid(rnd(1, t, peer_hq)) for _ in range(2))
                for x in (q, k, v, gc, gs):
                    x.requires_grad_(True)
                do = rnd(1, t, peer_hq, D)

                def fwd(q=q, k=k, v=v, gc=gc, gs=gs, cfg=cfg):
                    return parallel_nsa(q, k, v, gc, gs, None, block_counts=cfg.num_selected,
                                        block_size=cfg.block_size, window_size=0)

                def fwd_bwd(fwd=fwd, do=do, xs=(q, k, v, gc, gs)):
                    torch.autograd.grad(fwd(), xs, do)

                flops = flops_nsa(t, peer_hq, D, dataclasses.replace(cfg, window=0))["total"]
                for mode, f, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.5)):
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        t0 = time.perf_counter()
                        f()  # Triton compilation and autotuning
                        torch.cuda.synchronize()
                        compile_s = time.perf_counter() - t0
                        ms = triton.testing.do_bench(f, warmup=200, rep=1000, return_mode="median")
                    rec = Record(f"fla parallel_nsa w0 ({peer_hq}/{hkv})", shape, t, mode, ms,
                                 mult * flops / ms / 1e9, compile_s=round(compile_s, 1))
                    out.append(rec)
                    print(rec, flush=True)
                del q, k, v, gc, gs, do
            except Exception as e:  # noqa: BLE001
                out.append(Record("fla parallel_nsa w0", shape, t, "fwd+bwd", None, note=repr(e)))
                traceback.print_exc()
            torch.cuda.empty_cache()


def bench_jax(lengths: list[int], out: list[Record], variants: list[str],
              tiles: str = "", shapes: tuple[str, ...] = tuple(SHAPES),
              kind: str = "random") -> None:
    """Ours (with the `tiles` overrides of `BlockSizes`, named in the method), cuDNN dense."""
    bsz = parse_block_sizes(tiles)
    tag = f" [{tiles}]" if tiles else ""
    tag += "" if kind == "random" else f" {{{kind}}}"
    for t in lengths:
        for shape in shapes:
            hq, hkv, cfg, _ = SHAPES[shape]
            q, k, v, g, ct = inputs(jax.random.key(t), t, hq, hkv, jnp.bfloat16, kind)
            methods: dict[str, tuple[Callable, float]] = {}
            if "ours" in variants:
                methods[f"ours w{cfg.window}{tag}"] = (
                    lambda q, k, v, g, cfg=cfg: nsa_attention(q, k, v, g, cfg, block_sizes=bsz),
                    flops_nsa(t, hq, D, cfg)["total"])
            if "ours0" in variants:
                c0 = dataclasses.replace(cfg, window=0)
                methods[f"ours w0{tag}"] = (
                    lambda q, k, v, g, c0=c0: nsa_attention(q, k, v, g, c0, block_sizes=bsz),
                    flops_nsa(t, hq, D, c0)["total"])
            if "cudnn" in variants:
                methods[f"cudnn dense{tag if kind != 'random' else ''}"] = (
                    lambda q, k, v, g: jax.nn.dot_product_attention(
                        q, k, v, is_causal=True, implementation="cudnn"),
                    flops_dense(t, hq, D))
            for name, (fn, flops) in methods.items():
                method = f"{name} ({hq}/{hkv})"
                timed(out, method, shape, t, "fwd",
                      lambda fn=fn, a=(q, k, v, g): time_jax(jax.jit(fn), a), flops)
                timed(out, method, shape, t, "fwd+bwd",
                      lambda fn=fn, a=(q, k, v, g, ct): time_jax(jax.jit(loss_grad(fn)), a),
                      3.5 * flops)
            del q, k, v, g, ct


def parse_block_sizes(spec: str) -> BlockSizes:
    """`"num_warps=8,slc_rows=32"` -> `BlockSizes` with those fields changed, each value read
    by its field's type as `nsa-jax train` reads `model.attention.gpu_blocks.<field>=`."""
    kw = dict(item.split("=") for item in spec.split(",") if item)
    return from_dict(BlockSizes, kw, "tiles")


def breakdown(t: int, out: list[Record], spec: str = "",
              only: tuple[str, ...] = ("compressed", "selection", "selected", "window"),
              shapes: tuple[str, ...] = tuple(SHAPES), kind: str = "random") -> None:
    """Each stage of ours alone (fwd, and fwd+bwd where it has a gradient): where time goes.
    With token tiles (`slc_tokens > 1`) the selected stage's note gives the mean number of
    distinct blocks a tile walks, over `n` (1: its tokens chose the same blocks; `slc_tokens`:
    no block shared).

    Every array reaches the jitted stage as an argument: closed-over arrays would be baked
    into the executable as constants (gigabytes at 128K) and slow compilation down.
    """
    bsz = parse_block_sizes(spec)
    tag = f" [{spec}]" if spec else ""
    tag += "" if kind == "random" else f" {{{kind}}}"
    for shape in shapes:
        hq, hkv, cfg, _ = SHAPES[shape]
        q, k, v, _, ct = inputs(jax.random.key(t), t, hq, hkv, jnp.bfloat16, kind)
        plan = gpu_nsa.make_plan(1, t, hq, hkv, D, cfg, bsz)
        seg, segp, qp, kp, vp = gpu_nsa.pad_inputs(plan, q, k, v, None)
        ctp = jnp.pad(ct, ((0, 0), (0, plan.tp - t), (0, 0), (0, 0)))

        def cmp(q, k, v, seg, segp, plan=plan, cfg=cfg):
            return gpu_nsa.compressed_branch(plan, cfg, q, k, v, seg, segp, None)

        def sel(q, kc, lse, segp, bseg, plan=plan, cfg=cfg):
            return gpu_nsa.selection(plan, cfg, q, kc, lse, segp, bseg)

        def slc(q, k, v, segp, idx, plan=plan):
            return selected_attention(q, k, v, segp, idx, plan.slc)

        def win(q, k, v, segp, plan=plan):
            return gpu_nsa.window_branch(plan, q, k, v, segp)

        _, lse, kcp, bseg = jax.jit(cmp)(qp, k, v, seg, segp)
        idx = jax.jit(sel)(qp, kcp, lse, segp, bseg)
        stages = {  # name: (fn, its differentiable arguments, the others)
            "compressed": (lambda *a, cmp=cmp: cmp(*a)[0], (qp, k, v), (seg, segp)),
            "selection": (sel, (qp, kcp, lse), (segp, bseg)),
            "selected": (slc, (qp, kp, vp), (segp, idx)),
            "window": (win, (qp, kp, vp), (segp,)),
        }
        for name, (fn, diff, rest) in stages.items():
            if name not in only:
                continue
            method = f"stage {name}{tag} ({hq}/{hkv})"
            timed(out, method, shape, t, "fwd",
                  lambda fn=fn, a=(*diff, *rest): time_jax(jax.jit(fn), a))
            if name != "selection":  # the top-n choice has no gradient
                grad = loss_grad(fn, argnums=(0, 1, 2))
                timed(out, method, shape, t, "fwd+bwd",
                      lambda g=grad, a=(*diff, *rest, ctp): time_jax(jax.jit(g), a))
            if name == "selected" and plan.slc.tokens > 1:
                count = jax.jit(lambda i, tb=plan.slc.tokens: tile_unions(i, tb)[2])(idx)
                out[-1].note = f"union/n {float(count.mean()) / cfg.num_selected:.2f}"


# --------------------------------------------------------------------------- report


def markdown(records: list[Record]) -> str:
    lines = ["| shape | T | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    keyed: dict[tuple, dict[str, Record]] = {}
    for r in records:
        keyed.setdefault((r.shape, r.t, r.method), {})[r.mode] = r
    for (shape, t, method), modes in sorted(keyed.items(), key=lambda x: (x[0][0], x[0][1])):
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            r = modes.get(mode)
            if r is None or r.ms is None:
                cells += ["-", "-"]
            else:
                cells += [f"{r.ms:.2f}", "-" if r.tflops is None else f"{r.tflops:.0f}"]
        lines.append(f"| {shape} | {t // 1024}K | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    for i, shape in enumerate(SHAPES):
        for j, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[i][j]
            methods = sorted({r.method for r in records
                              if r.shape == shape and not r.method.startswith("stage")})
            for m in methods:
                pts = sorted((r.t, r.ms) for r in records
                             if r.shape == shape and r.mode == mode and r.method == m and r.ms)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=m)
            ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms",
                   title=f"{shape} {mode}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--variants", default="ours,ours0,cudnn,fla")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--tiles", default="",
                    help="BlockSizes overrides for ours in the main table, e.g. 'slc_tokens=2' "
                         "(the fields of `nsa-jax train ... model.attention.gpu_blocks.<field>=`)")
    ap.add_argument("--breakdown", default="",
                    help="lengths at which to time each stage of ours alone, e.g. 32768")
    ap.add_argument("--tune", default="",
                    help="';'-separated BlockSizes overrides timed beside --tiles in the "
                         "main table and in the breakdown, e.g. 'num_warps=8;slc_tokens=9'")
    ap.add_argument("--stages", default="compressed,selection,selected,window",
                    help="stages the breakdown times")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="of " + ", ".join(SHAPES))
    ap.add_argument("--inputs", default="random", choices=INPUTS,
                    help="q and k: independent per token, or drifting over 64 tokens")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    variants = args.variants.split(",")
    meta = {"device": str(jax.devices()[0]), "jax": jax.__version__,
            "command": " ".join(sys.argv)}
    print(meta, flush=True)
    checks = [] if args.no_check else check()
    records: list[Record] = []

    def save() -> None:
        (out / "results.json").write_text(json.dumps(
            {"meta": meta, "checks": checks, "records": [dataclasses.asdict(r) for r in records]},
            indent=1))
        (out / "results.md").write_text(markdown(records))

    if "fla" in variants:
        bench_fla(lengths, records)
        save()
    shapes = tuple(args.shapes.split(","))
    for t in lengths:
        for spec in [args.tiles, *(x for x in args.tune.split(";") if x)]:
            bench_jax([t], records, variants, spec, shapes, args.inputs)
            save()
            variants = [x for x in variants if x != "cudnn"]  # once per length is enough
        variants = args.variants.split(",")
    for t in (int(x) for x in args.breakdown.split(",") if x):
        for spec in ["", *(x for x in args.tune.split(";") if x)]:
            breakdown(t, records, spec, tuple(args.stages.split(",")), shapes, args.inputs)
            save()
    plot(records, out / "times.png")
    print(markdown(records))


if __name__ == "__main__":
    main()
