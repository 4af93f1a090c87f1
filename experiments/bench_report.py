"""Merge `bench_attention.py` result files into one table, a speed-up table and a plot.

Long sweeps are split over several device calls (each has a time limit); this joins them.

    python experiments/bench_report.py experiments/results/bench_attention_h100_s1/call*.json \
        --out experiments/results/bench_attention_h100_s1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_attention import Record, markdown, plot

# (shape, ours, peer) pairs compared against the targets
PAIRS = {
    "paper64": ("ours w0 (64/4)", "fla parallel_nsa w0 (64/4)", "cudnn dense (64/4)"),
    "videonsa28": ("ours w256 (28/4)", "fla parallel_nsa w0 (64/4)", "cudnn dense (28/4)"),
}


def load(paths: list[Path]) -> list[Record]:
    """Records of every file; a later file's record replaces an earlier one with the same key."""
    merged: dict[tuple, Record] = {}
    for path in paths:
        for r in json.loads(path.read_text())["records"]:
            rec = Record(**r)
            merged[(rec.method, rec.shape, rec.t, rec.mode)] = rec
    return list(merged.values())


def speedups(records: list[Record]) -> str:
    """Per shape, length and mode: ours / peer time, and dense / ours time."""
    ms = {(r.method, r.shape, r.t, r.mode): r.ms for r in records if r.ms}
    lines = ["| shape | T | mode | ours ms | ours / fla | cuDNN dense / ours |",
             "|---|---|---|---|---|---|"]
    for shape, (ours, peer, dense) in PAIRS.items():
        for t in sorted({r.t for r in records if r.shape == shape}):
            for mode in ("fwd", "fwd+bwd"):
                o = ms.get((ours, shape, t, mode))
                if o is None:
                    continue
                p, d = ms.get((peer, shape, t, mode)), ms.get((dense, shape, t, mode))
                cells = [f"{o:.1f}", f"{o / p:.2f}x" if p else "-", f"{d / o:.1f}x" if d else "-"]
                lines.append(f"| {shape} | {t // 1024}K | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    records = load(args.results)
    report = markdown(records) + "\n" + speedups(records)
    (args.out / "report.md").write_text(report)
    plot(records, args.out / "times.png")
    print(report)


if __name__ == "__main__":
    main()
