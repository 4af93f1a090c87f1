"""Tile sweep of the fused text-row kernel (`pallas_kernels.gpu.banded_rows` through
`attention.dense.dense_rows`) on one GPU: the hybrid layer's text rows (the
`bench_model.py` layer layout, ~3% text rows, Qwen shape 28/4 heads, D = 128, bf16),
forward+backward, per `BandParams` candidate, at each length. The NSA rows of the same layer
are timed once per length, so each candidate's share of a hybrid layer,
`rows / (rows + nsa)`, is printed beside its time (the issue-13 target: <= 10%).

    python experiments/row_tiles.py --out experiments/results/row_tiles_h200 \\
        --lengths 32768,131072
    python experiments/row_tiles.py --quick --out /tmp/row_tiles   # interpret mode, any host

Writes `results.json` and `results.md` under `--out` after every candidate (a call cut by
its time limit keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_model import error_text, layer_inputs, model_config, timed  # noqa: E402

from nsa_jax.attention.dense import dense_band, dense_rows  # noqa: E402
from nsa_jax.attention.hybrid import (  # noqa: E402
    gate_values,
    gather_rows,
    take_rows,
    text_row_bucket,
)
from nsa_jax.attention.nsa import nsa_attention  # noqa: E402

# (block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages); the first is the default
CANDIDATES = (
    (64, 64, 64, 64, 4, 2),
    (128, 64, 64, 64, 4, 2),
    (128, 64, 64, 64, 8, 2),
    (128, 128, 64, 64, 8, 2),
    (64, 128, 64, 64, 4, 2),
    (128, 64, 64, 64, 8, 3),
    (64, 64, 64, 128, 4, 2),
    (64, 64, 128, 64, 8, 2),
    (64, 64, 128, 128, 8, 2),
    (128, 64, 64, 128, 8, 3),
)
QUICK_CANDIDATES = CANDIDATES[:2]


def row_inputs(t: int, quick: bool):
    """The text rows of `bench_model.layer_inputs(t)`: their queries `[1, R, Hq, D]` and
    positions `[1, R]` (`-1` in unused slots), with the layer's q, k, v and gate logits."""
    q, k, v, g, video = layer_inputs(t, quick)
    slots = text_row_bucket(int((~video).sum()), t)
    rows = gather_rows(~video, slots)
    return (take_rows(q, rows), rows), (q, k, v, g), slots


def params_of(c: tuple[int, ...], d: int):
    bq, bk, bqb, bkb, warps, stages = c
    return dataclasses.replace(dense_band(d), block_q=bq, block_k=bk, block_q_bwd=bqb,
                               block_k_bwd=bkb, num_warps=warps, num_stages=stages)


def grad_of(fn, args, n_diff: int):
    """jitted gradient of `sum(fn(*args) * cotangent)` in the first `n_diff` arguments."""
    cot = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, *args).shape, args[0].dtype)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) * cot.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=tuple(range(n_diff))))


def report(results: list[dict], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| tokens | block_q, block_k (fwd) | block_q, block_k (bwd) | warps | stages "
             "| rows fwd+bwd ms | NSA rows ms | rows' share of a hybrid layer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["candidate"]
        ms = f"{r['ms']:.2f}" if "ms" in r else r.get("error", "-")[:60]
        share = f"{r['share']:.1%}" if "share" in r else "-"
        lines.append(f"| {r['tokens']} | {c[0]}, {c[1]} | {c[2]}, {c[3]} | {c[4]} | {c[5]} "
                     f"| {ms} | {r.get('nsa_ms', float('nan')):.2f} | {share} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, interpret mode")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = (256,) if a.quick else tuple(int(x) for x in a.lengths.split(","))
    nsa_cfg = model_config("hybrid", a.quick).nsa
    results: list[dict] = []
    for t in lengths:
        (q_rows, rows), (q, k, v, g), slots = row_inputs(t, a.quick)
        d = q.shape[-1]

        def nsa(q, k, v, g):
            return nsa_attention(q, k, v, gate_values(g, nsa_cfg.gate_temperature), nsa_cfg)

        nsa_ms = timed(grad_of(nsa, (q, k, v, g), 4), (q, k, v, g), a.iters)["ms"]
        print(f"T={t}: {slots} text-row slots; NSA rows {nsa_ms:.2f} ms", flush=True)
        for c in QUICK_CANDIDATES if a.quick else CANDIDATES:
            p = params_of(c, d)

            def rows_fn(qr, k, v, rows, p=p):
                return dense_rows(qr, rows, k, v, implementation="pallas_gpu", band=p)

            args = (q_rows, k, v, rows)
            r: dict = {"tokens": t, "slots": slots, "candidate": list(c), "nsa_ms": nsa_ms}
            try:
                timed(grad_of(rows_fn, args, 3), args, a.iters, r)
                r["share"] = r["ms"] / (r["ms"] + nsa_ms)
            except Exception as e:  # noqa: BLE001 (a tile that does not compile is a result)
                r["error"] = error_text(e)
            print(f"  {c}: " + (f"{r['ms']:.2f} ms, share {r['share']:.1%}" if "ms" in r
                                else r["error"]), flush=True)
            results.append(r)
            report(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
