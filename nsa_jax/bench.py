"""`nsa-jax bench-attention`: times NSA against dense causal attention on this machine."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from nsa_jax.attention import NSAConfig, dense_attention, nsa_attention
from nsa_jax.attention.flops import flops_dense, flops_nsa

QUICK_LENGTHS = (512, 1024, 2048)
FULL_LENGTHS = (1024, 2048, 4096, 8192)


def _time(fn: Callable[..., jax.Array], args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(
    lengths: tuple[int, ...],
    heads: int,
    kv_heads: int,
    head_dim: int,
    cfg: NSAConfig,
    repeats: int,
    implementation: str,
    dtype: jnp.dtype,
) -> list[dict[str, float]]:
    nsa = jax.jit(partial(nsa_attention, cfg=cfg, implementation=implementation))
    dense = jax.jit(dense_attention)
    rows = []
    for i, t in enumerate(lengths):
        kq, kk, kv, kg = jax.random.split(jax.random.key(i), 4)
        q = jax.random.normal(kq, (1, t, heads, head_dim), dtype)
        k = jax.random.normal(kk, (1, t, kv_heads, head_dim), dtype)
        v = jax.random.normal(kv, (1, t, kv_heads, head_dim), dtype)
        g = jax.nn.sigmoid(jax.random.normal(kg, (1, t, heads, 3), jnp.float32))
        t_nsa = _time(nsa, (q, k, v, g), repeats)
        t_dense = _time(dense, (q, k, v), repeats)
        row = {
            "T": t,
            "nsa_ms": 1e3 * t_nsa,
            "dense_ms": 1e3 * t_dense,
            "speedup": t_dense / t_nsa,
            "nsa_gflops": flops_nsa(t, heads, head_dim, cfg)["total"] / t_nsa / 1e9,
            "dense_gflops": flops_dense(t, heads, head_dim) / t_dense / 1e9,
        }
        rows.append(row)
        print(
            f"  T={t}: nsa {row['nsa_ms']:.1f} ms, dense {row['dense_ms']:.1f} ms "
            f"[{i + 1}/{len(lengths)}]",
            file=sys.stderr,
            flush=True,
        )
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| T | NSA ms | dense ms | dense/NSA | NSA GFLOP/s | dense GFLOP/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['nsa_ms']:.1f} | {r['dense_ms']:.1f} | {r['speedup']:.2f}x | "
            f"{r['nsa_gflops']:.1f} | {r['dense_gflops']:.1f} |"
        )
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    cfg = NSAConfig(block_size=args.block_size, num_selected=args.num_selected, window=args.window)
    lengths = (
        tuple(args.lengths) if args.lengths else (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    )
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    print(
        f"NSA ({args.implementation}, block {cfg.block_size}, {cfg.num_selected} blocks, "
        f"window {cfg.window}) vs dense causal attention on {jax.default_backend()}: "
        f"B=1, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype}, "
        f"median of {args.repeats}",
        file=sys.stderr,
    )
    rows = run(
        lengths,
        args.heads,
        args.kv_heads,
        args.head_dim,
        cfg,
        args.repeats,
        args.implementation,
        dtype,
    )
    print(format_table(rows))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench-attention",
        help="time NSA against dense causal attention",
        description="Times NSA (forward) against dense causal attention at a few sequence "
        "lengths on the default JAX backend and prints a Markdown table. FLOP rates count the "
        "work each method needs (causal keys only).",
    )
    p.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS}, small heads")
    p.add_argument(
        "--lengths", type=int, nargs="+", help=f"sequence lengths (default {FULL_LENGTHS})"
    )
    p.add_argument(
        "--heads", type=int, default=None, help="query heads (default 28; 8 with --quick)"
    )
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    p.add_argument(
        "--head-dim", type=int, default=None, help="head dim (default 128; 64 with --quick)"
    )
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-selected", type=int, default=None, help="default 32; 4 with --quick")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--implementation", default="auto", help="auto, reference, pallas_tpu, pallas_gpu"
    )
    p.set_defaults(func=_apply_quick_defaults)


def _apply_quick_defaults(args: argparse.Namespace) -> int:
    if args.heads is None:
        args.heads = 8 if args.quick else 28
    if args.head_dim is None:
        args.head_dim = 64 if args.quick else 128
    if args.num_selected is None:
        args.num_selected = 4 if args.quick else 32
    return _main(args)
