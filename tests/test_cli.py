"""The `nsa-jax` command: help everywhere, and the main job's table."""

from __future__ import annotations

import argparse
import time

import pytest

from nsa_jax import cli


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from _subcommands(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    commands = list(_subcommands(cli.build_parser()))
    assert ("bench-attention",) in commands
    for command in [(), *commands]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: nsa-jax" in capsys.readouterr().out


def test_bench_attention_prints_a_table(capsys):
    argv = [
        "bench-attention",
        "--lengths",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "16",
        "--block-size",
        "16",
        "--num-selected",
        "2",
        "--window",
        "32",
        "--repeats",
        "1",
    ]
    start = time.perf_counter()
    assert cli.main(argv) == 0
    wall = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "| T | NSA ms | dense ms |" in out
    row = [line for line in out.splitlines() if line.startswith("| 128 |")]
    assert len(row) == 1
    nsa_ms, dense_ms = (float(x) for x in row[0].split("|")[2:4])
    assert 0 < nsa_ms / 1e3 < wall and 0 < dense_ms / 1e3 < wall, (row, wall)
