"""The `nsa-jax` command. Each room registers its subcommands in `COMMANDS`.

A command module exposes `register(subparsers)`, which adds its parser(s) and sets
`func=<callable taking the parsed args and returning an exit code>`. Modules are imported
only to build the parser, so start-up stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: list[str] = [
    "nsa_jax.bench",
    "nsa_jax.ckpt",
    "nsa_jax.convert.cli",
    "nsa_jax.demo",
    "nsa_jax.eval.cli",
    "nsa_jax.train.cli",
    "nsa_jax.train.tpu_compile",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nsa-jax",
        description="VideoNSA (Qwen2.5-VL + Native Sparse Attention) in JAX: "
        "benchmarks, conversion, training and evaluation.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
