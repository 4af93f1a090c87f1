"""Compiles the TPU kernels for v5e, v5p and v6e with libtpu on this host (no TPU needed).

For each `(generation, case)` of `pallas_kernels.tpu.aot.sweep_cases` (or the `--only` subset,
or `--per-branch` lengths with every branch on its own) records the compiled HBM use per chip,
the compile time and XLA's `cost_analysis()` FLOPs and bytes (Pallas calls count their
`CostEstimate`; a loop of chunked calls counts one chunk), or the compiler's error.
Results merge into `experiments/results/tpu_compile/tpu_compile.json` (keyed by generation and
case, so runs can be split), which also feeds the plot beside it and the compiled section of
`docs/tpu_roofline.md` (between the `compiled` markers):

    JAX_PLATFORMS=cpu python experiments/tpu_compile.py                # the whole sweep
    JAX_PLATFORMS=cpu python experiments/tpu_compile.py --per-branch 32768 131072
    JAX_PLATFORMS=cpu python experiments/tpu_compile.py --report       # doc + plot only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another compiling process
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pallas_kernels.tpu import aot  # noqa: E402

OUT = ROOT / "experiments" / "results" / "tpu_compile" / "tpu_compile.json"
DOC = ROOT / "docs" / "tpu_roofline.md"
GIB = 1 << 30
# kernel versions whose programs equal an earlier version's: results compiled at the earlier one
# count as current. 9890d5d merged main's `_compat` switch (`compiling_for_tpu`) and reference
# changes (`fla_topk`, whose default moved `videonsa_compat`'s top-k from fla 0.3.1 to 0.3.0):
# lowered for v5e/v5p (NSA fwd+bwd at 4K, blocks 64 and 16; fwd at 8K), its StableHLO and Mosaic
# bodies equal bc7643f's byte for byte but for the source paths. Compat programs changed.
SAME_PROGRAMS = {"9890d5d": ("bc7643f",)}


def per_branch_cases(lengths: list[int], generations: list[str]) -> list[tuple[str, aot.NSACase]]:
    """Every branch alone at the Qwen shape, forward and forward+backward, per length."""
    cases = []
    for gen in generations:
        for t in lengths:
            for branch in aot.BRANCHES:
                modes = (False,) if branch == "selection" else (False, True)
                cases += [(gen, aot.NSACase(t, branch=branch, backward=bwd)) for bwd in modes]
    return cases


def kernel_version(case: aot.NSACase) -> str:
    """The last commit that touched the case's kernels (splash's wrapper for dense, else the
    package less the GPU kernels and this sweep's own list): a result names the code it
    compiled."""
    if case.branch == "dense":
        paths = ["pallas_kernels/tpu/dense.py"]
    else:
        paths = ["pallas_kernels", ":(exclude)pallas_kernels/gpu",
                 ":(exclude)pallas_kernels/tpu/aot.py"]  # fmt: skip

    def git(*args: str) -> str:
        return subprocess.run(["git", *args, "--", *paths], cwd=ROOT, capture_output=True,
                              text=True, check=False).stdout.strip()  # fmt: skip

    return git("log", "-1", "--format=%h") + ("+dirty" if git("status", "--porcelain") else "")


def run(cases: list[tuple[str, aot.NSACase]], path: Path, redo: bool = False) -> None:
    results = json.loads(path.read_text()) if path.exists() else {}
    for gen, case in cases:
        key = f"{gen} {case.name}"
        version = kernel_version(case)
        same = () if case.cfg.videonsa_compat else SAME_PROGRAMS.get(version, ())
        if not redo and results.get(key, {}).get("kernel") in (version, *same):
            print(f"have {key} (kernel {version})", flush=True)
            continue
        print(f"compiling {key} ...", flush=True)
        try:
            st = aot.compile_case(case, gen)
            rec = dict(generation=gen, case=case.name, t=case.t, ok=True,
                       fits=st.hbm_bytes <= aot.HBM_BYTES[gen], compile_s=st.compile_s,
                       hbm_bytes=st.hbm_bytes, temp_bytes=st.temp_bytes, flops=st.flops,
                       bytes_accessed=st.bytes_accessed, kernel=version)  # fmt: skip
            print(f"  {st.compile_s:.0f} s, HBM {st.hbm_bytes / GIB:.2f} GiB", flush=True)
        except Exception as e:  # the compiler's verdict is the result
            rec = dict(generation=gen, case=case.name, t=case.t, ok=False, kernel=version,
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:400]}")  # fmt: skip
            traceback.print_exc()
        save(path, key, rec)


def save(path: Path, key: str, rec: dict) -> None:
    """Adds one result to the file as it is now (runs over other generations may share it),
    written whole to a temporary file and renamed over it (a killed run loses nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = rec
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


def _fmt(rec: dict) -> str:
    # the kernels' commit that compiled it; results kept from before results named one (the
    # first session's) compiled the 56-row selected tile and sorted every backward list in XLA
    at = f" @{rec['kernel']}" if rec.get("kernel") else " @pre-e8be6be"
    if not rec["ok"]:
        return "fails: " + rec["error"][:60] + at
    gf = "" if rec.get("flops") is None else f", {rec['flops'] / 1e12:.1f} TFLOP"
    gb = "" if rec.get("bytes_accessed") is None else f", {rec['bytes_accessed'] / 1e9:.0f} GB"
    return f"{rec['hbm_bytes'] / GIB:.2f} GiB, {rec['compile_s']:.0f} s{gf}{gb}{at}"


def report(path: Path, doc: Path) -> None:
    results = json.loads(path.read_text())
    gens = [g for g in aot.TOPOLOGIES if any(r["generation"] == g for r in results.values())]
    names = sorted({r["case"] for r in results.values()},
                   key=lambda n: (n.split()[0] != "nsa", n.split()[0], n.split()[1],
                                  int(n.split()[2][1:]), n))  # fmt: skip
    lines = [
        "Per chip: compiled HBM (arguments + outputs + temporaries), compile time on this "
        "project's 2-core host (shared with other jobs: load 10-30 while these ran), and XLA's "
        "cost_analysis FLOPs and bytes (splash's kernels give it no estimate: dense shows 0). "
        "Pallas calls count every grid step of their block lists, but XLA counts the body of "
        "a loop once, not once per trip: the kernels that walk their lists in chunks count one "
        "chunk, so these are not the layer's work (the roofline tables are). @commit: the last "
        "commit of the kernels (for dense, of `dense.py`) when the program was compiled "
        "(@bc7643f stands for today's kernels too: `SAME_PROGRAMS`); @pre-e8be6be: before the "
        "126-row selected tile and the static backward pairs.",
        "",
        "| program | " + " | ".join(gens) + " |",
        "|---|" + "---|" * len(gens),
    ]
    for name in names:
        cells = [results.get(f"{g} {name}") for g in gens]
        lines.append(f"| {name} | " + " | ".join("" if c is None else _fmt(c) for c in cells)
                     + " |")  # fmt: skip
    failed = [k for k, r in results.items() if not r["ok"] or not r.get("fits", True)]
    lines += ["", f"{len(results)} programs compiled or tried; "
              + (f"failing or over HBM: {', '.join(failed)}." if failed else "all fit.")]
    begin, end = "<!-- compiled: begin -->", "<!-- compiled: end -->"
    text = doc.read_text()
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
    plot(results, path.with_suffix(".png"))
    print("\n".join(lines))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, gen in enumerate(aot.TOPOLOGIES):
        for style, mode in (("-o", "fwd+bwd"), ("--s", "fwd")):
            recs = sorted((r for r in results.values() if r["generation"] == gen and r["ok"]
                           and r["case"].startswith(f"nsa {mode} ")
                           and " B1 28/4 D128 l64" in r["case"]
                           and r["case"].endswith("l64")), key=lambda r: r["t"])  # fmt: skip
            if not recs:
                continue
            ts = [r["t"] for r in recs]
            axes[0].plot(ts, [r["hbm_bytes"] / GIB for r in recs], style, color=f"C{i}",
                         label=f"{gen} {mode}")
            axes[1].plot(ts, [r["compile_s"] for r in recs], style, color=f"C{i}",
                         label=f"{gen} {mode}")
        axes[0].axhline(aot.HBM_BYTES[gen] / GIB, color=f"C{i}", lw=0.6, ls=":")
    axes[0].set(xscale="log", yscale="log", xlabel="tokens", ylabel="GiB per chip",
                title="compiled HBM (dotted: the chip's HBM)")
    axes[1].set(xscale="log", xlabel="tokens", ylabel="s", title="compile time")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("NSA (pallas_kernels.tpu), Qwen2.5-VL-7B shape, B = 1, compiled by libtpu")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generations", nargs="+", default=list(aot.TOPOLOGIES))
    ap.add_argument("--only", nargs="+", default=None, help="substrings of case names to keep")
    ap.add_argument("--per-branch", nargs="+", type=int, default=None, metavar="T")
    ap.add_argument("--report", action="store_true", help="rewrite doc and plot only")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--redo", action="store_true", help="recompile results of this kernel too")
    args = ap.parse_args()
    path = Path(args.out)
    if not args.report:
        gens = tuple(args.generations)
        if args.per_branch:
            cases = per_branch_cases(args.per_branch, list(gens))
        else:
            cases = aot.sweep_cases(gens)
        if args.only:
            cases = [(g, c) for g, c in cases if any(s in f"{g} {c.name}" for s in args.only)]
        run(cases, path, args.redo)
    report(path, DOC)


if __name__ == "__main__":
    main()
