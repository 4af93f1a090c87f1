"""Roofline model of the Pallas TPU NSA kernels against dense causal flash attention.

No TPU is needed: FLOPs and HBM bytes are counted from the kernels' own visit lists
(`window.band_lists`, `compressed.prefix_lists`; the selected branch's lists depend on the data,
so it is bounded) and tile sizes (the defaults of each `*BlockSizes`), and the time on a chip
is `max(FLOPs / peak, bytes / bandwidth)` per kernel (each kernel is either MXU- or HBM-bound;
overlap inside a kernel is assumed perfect, so these are lower bounds).

Shapes: Qwen2.5-VL-7B attention (Hq = 28, Hkv = 4, D = 128), bf16, batch 1; VideoNSA's
setting (block 64, 32 selected blocks, window 256, mean pooling). Rewrites the generated part
of `docs/tpu_roofline.md` (between the `generated` markers), `docs/tpu_roofline.json` and
`docs/tpu_roofline.png`:

    python experiments/tpu_roofline.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from nsa_jax.attention import NSAConfig  # noqa: E402
from nsa_jax.attention.flops import flops_dense, flops_nsa  # noqa: E402
from pallas_kernels.tiles import (  # noqa: E402
    CompressedBlockSizes,
    SelectedBlockSizes,
    WindowBlockSizes,
)
from pallas_kernels.tpu.compressed import prefix_lists, selection_band  # noqa: E402
from pallas_kernels.tpu.window import band_lists  # noqa: E402

# Published per-chip peaks (bf16 FLOP/s, HBM bytes/s), Google Cloud TPU documentation:
# https://cloud.google.com/tpu/docs/v5e, .../v5p, .../v6e (pages read November 2026).
CHIPS = {"v5e": (197e12, 819e9), "v5p": (459e12, 2765e9), "v6e": (918e12, 1638e9)}
HQ, HKV, D = 28, 4, 128
G = HQ // HKV
CFG = NSAConfig(block_size=64, num_selected=32, window=256)
LENGTHS = (32768, 65536, 131072)
BF16, F32 = 2, 4
# Per-row side inputs (segment, position, lse, delta, selection) travel packed in one
# lane-dense `[.., C, R]` f32 array per kernel (`block_sparse.pack_rows`, C padded to 8
# sublanes), and lse leaves the forward as `[.., 1, R]` (8 sublanes): 32 bytes a row for C <= 8.
DENSE_TILE = 512  # splash attention's usual block_q = block_kv


@dataclasses.dataclass
class Cost:
    name: str
    flops: float
    bytes: float

    def ms(self, chip: str) -> float:
        peak, bw = CHIPS[chip]
        return 1e3 * max(self.flops / peak, self.bytes / bw)

    def bound(self, chip: str) -> str:
        peak, bw = CHIPS[chip]
        return "MXU" if self.flops / peak >= self.bytes / bw else "HBM"


def family(name: str, *, heads: int, nq: int, r: int, k: int, pairs: float, nk: int,
           n_idx: int = 0) -> list[Cost]:
    """Forward, dq and dk/dv of one `block_sparse` attention per (batch row, head group).

    `heads` groups (KV heads, or query heads for per-head dense kernels), `nq` query tiles of
    `r` rows, key tiles of `k` keys, `pairs` visited (query tile, key tile) pairs, `nk` key
    tiles, `n_idx` selection columns per row. Side rows are `C` packed 32-bit values, C padded
    to 8 sublanes (lane-dense, rows along lanes).
    """
    qt = r * D * BF16  # one query-side tile (q, o, do or dq)
    kt = k * D * BF16  # one key-side tile (k, v, dk or dv)
    row = lambda c: r * F32 * -(-c // 8) * 8  # noqa: E731
    kmeta = 2 * k * F32  # key segments and positions
    # forward: q, o, packed rows (written by XLA, read by the kernel), lse out
    fwd = Cost(f"{name} fwd", pairs * 4 * r * k * D, nq * (2 * qt + 2 * row(2 + n_idx) + row(1))
               + pairs * (2 * kt + kmeta))  # fmt: skip
    dq = Cost(f"{name} dq", pairs * 6 * r * k * D, nq * (3 * qt + 2 * row(4 + n_idx))
              + pairs * (2 * kt + kmeta))  # fmt: skip
    # dk/dv: the query side streams per pair; each key tile's f32 sums are read and written
    # once per pair chunk (once, for lists within the SMEM budget), zero-initialised by XLA
    dkdv = Cost(f"{name} dk/dv", pairs * 8 * r * k * D,
                pairs * (2 * qt + row(4 + n_idx) + kmeta) + nk * 14 * kt)  # fmt: skip
    return [dataclasses.replace(c, flops=c.flops * heads, bytes=c.bytes * heads)
            for c in (fwd, dq, dkdv)]  # fmt: skip


def nsa_costs(t: int, selected_union: str) -> list[Cost]:
    """Every kernel of one NSA layer (forward, then backward) at length `t`."""
    row = lambda r, c: r * F32 * -(-c // 8) * 8  # noqa: E731
    costs: list[Cost] = []
    nc, ns = CFG.num_cmp_blocks(t), CFG.num_sel_blocks(t)
    # compressed: causal prefix of compressed-key tiles
    cb = CompressedBlockSizes()
    cl = prefix_lists(t, CFG, cb, 1, 1)
    cq, ck = -(-t // cb.block_q), -(-nc // cb.block_kv)
    c_pairs = float(np.asarray(cl.kv_count).sum())
    cmp = family("compressed", heads=HKV, nq=cq, r=cb.block_q * G, k=cb.block_kv,
                 pairs=c_pairs, nk=ck)  # fmt: skip
    # importance: one more QK^T, the group-sum matmul and the key tile's band of Eq. 9;
    # scores out per token
    band = selection_band(t, CFG, cb.block_kv)
    w, wb = band.width, band.band
    r = cb.block_q * G
    imp = Cost("importance", HKV * c_pairs * (2 * r * cb.block_kv * D + 2 * cb.block_q * r
                                              * cb.block_kv + 2 * cb.block_q * cb.block_kv * wb),
               HKV * (cq * (r * D * BF16 + 2 * row(r, 3) + cb.block_q * w * F32)
                      + c_pairs * (cb.block_kv * D * BF16 + cb.block_kv * wb * F32)))  # fmt: skip
    topn = Cost("top-n (XLA)", 0.0, HKV * t * (w * F32 + CFG.num_selected * F32))
    # selected: tiles of block_q tokens visit the union of their tokens' blocks
    sbq = SelectedBlockSizes().tokens(G)
    sq = -(-t // sbq)
    # blocks started by the tile's last token (a tile may straddle two selection blocks)
    cand = np.minimum((np.arange(sq) + 1) * sbq, t) - 1
    cand = cand // CFG.block_size + 1
    per_tile = CFG.num_selected if selected_union == "shared" else sbq * CFG.num_selected
    s_pairs = float(np.minimum(cand, per_tile).sum())
    slc = family("selected", heads=HKV, nq=sq, r=sbq * G, k=CFG.block_size,
                 pairs=s_pairs, nk=ns, n_idx=CFG.num_selected)
    # window: band of key tiles
    wb = WindowBlockSizes()
    wl = band_lists(t, CFG.window, wb, 1, 1)
    swa = family("window", heads=HKV, nq=-(-t // wb.block_q), r=wb.block_q * G, k=wb.block_kv,
                 pairs=float(np.asarray(wl.kv_count).sum()), nk=-(-t // wb.block_kv))
    # XLA glue: compression reads k, v; layouts copy q/o per branch; the gate mix
    io = t * HQ * D * BF16
    glue_f = Cost("XLA glue fwd", 0.0, 2 * t * HKV * D * BF16 + 3 * 2 * io * 2 + 5 * io)
    glue_b = Cost("XLA glue bwd", 0.0, 2 * glue_f.bytes)
    costs += [cmp[0], imp, topn, slc[0], swa[0], glue_f]
    costs += [cmp[1], cmp[2], slc[1], slc[2], swa[1], swa[2], glue_b]
    return costs


def dense_costs(t: int) -> list[Cost]:
    """Dense causal flash attention, splash-style: per query head, 512 x 512 tiles, causal
    tile pairs (diagonal tiles computed in full)."""
    n = -(-t // DENSE_TILE)
    pairs = n * (n + 1) / 2
    # splash keeps its per-row statistics lane-dense (`[heads, T]`)
    return family("dense", heads=HQ, nq=n, r=DENSE_TILE, k=DENSE_TILE, pairs=pairs, nk=n)


def totals(costs: list[Cost], chip: str, bwd: bool) -> float:
    names_fwd = ("fwd", "importance", "top-n")
    keep = [c for c in costs if bwd or any(s in c.name for s in names_fwd)]
    return sum(c.ms(chip) for c in keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "tpu_roofline.md"))
    args = ap.parse_args()
    chips = list(CHIPS)
    lines: list[str] = []
    record: dict = {"chips": CHIPS, "shape": dict(hq=HQ, hkv=HKV, d=D), "cfg": str(CFG),
                    "lengths": {}}  # fmt: skip
    for t in LENGTHS:
        shared, disjoint, dense = nsa_costs(t, "shared"), nsa_costs(t, "disjoint"), dense_costs(t)
        lines += [f"### T = {t // 1024}K tokens", "",
                  "| kernel | GFLOP | GB | " + " | ".join(f"{c} ms" for c in chips) + " |",
                  "|---|---:|---:|" + "---:|" * len(chips)]  # fmt: skip
        disj = {c.name: c for c in disjoint}
        for c in shared + dense:
            cells = [f"{c.ms(ch):.2f} ({c.bound(ch)})" for ch in chips]
            label = c.name
            if c.name.startswith("selected"):
                o = disj[c.name]
                label += " (shared / disjoint)"
                cells = [f"{c.ms(ch):.2f} / {o.ms(ch):.2f} ({o.bound(ch)})" for ch in chips]
                lines.append(f"| {label} | {c.flops / 1e9:.0f} / {o.flops / 1e9:.0f} | "
                             f"{c.bytes / 1e9:.1f} / {o.bytes / 1e9:.1f} | "
                             + " | ".join(cells) + " |")  # fmt: skip
                continue
            lines.append(f"| {label} | {c.flops / 1e9:.0f} | {c.bytes / 1e9:.1f} | "
                         + " | ".join(cells) + " |")  # fmt: skip
        lines += ["", "| total (ms) | " + " | ".join(chips) + " |", "|---|" + "---:|" * len(chips)]
        rec: dict = {}
        for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
            ns_ = [totals(shared, ch, bwd) for ch in chips]
            nd_ = [totals(disjoint, ch, bwd) for ch in chips]
            dd_ = [totals(dense, ch, bwd) for ch in chips]
            lines.append(f"| NSA {mode}, selection shared / disjoint | "
                         + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(ns_, nd_, strict=True))
                         + " |")  # fmt: skip
            lines.append(f"| dense {mode} | " + " | ".join(f"{x:.1f}" for x in dd_) + " |")
            lines.append(f"| speed-up {mode} (shared / disjoint) | " + " | ".join(
                f"{d / a:.1f}x / {d / b:.1f}x"
                for a, b, d in zip(ns_, nd_, dd_, strict=True)) + " |")  # fmt: skip
            rec[mode] = {"nsa_shared_ms": dict(zip(chips, ns_, strict=True)),
                         "nsa_disjoint_ms": dict(zip(chips, nd_, strict=True)),
                         "dense_ms": dict(zip(chips, dd_, strict=True))}  # fmt: skip
        useful = flops_nsa(t, HQ, D, CFG)
        rec["useful_fwd_gflop"] = {k: v / 1e9 for k, v in useful.items()}
        rec["dense_useful_fwd_gflop"] = flops_dense(t, HQ, D) / 1e9
        rec["kernels"] = [dataclasses.asdict(c) for c in shared + disjoint + dense]
        record["lengths"][t] = rec
        lines += ["", "Useful forward FLOPs (exact masks, `nsa_jax.attention.flops.flops_nsa`): "
                  f"compressed {useful['compressed'] / 1e9:.0f}, "
                  f"selected {useful['selected'] / 1e9:.0f}, "
                  f"window {useful['window'] / 1e9:.0f} GFLOP; dense "
                  f"{flops_dense(t, HQ, D) / 1e9:.0f} GFLOP.", ""]  # fmt: skip
    doc = Path(args.doc)
    begin, end = "<!-- generated: begin -->", "<!-- generated: end -->"
    text = doc.read_text() if doc.exists() else f"{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    doc.write_text(head + begin + "\n" + "\n".join(lines) + "\n" + end + tail)
    doc.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    plot(record, doc.with_suffix(".png"))
    print("\n".join(lines))


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    ts = sorted(record["lengths"])
    for ax, mode in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for i, chip in enumerate(CHIPS):
            col = f"C{i}"
            get = lambda key: [record["lengths"][t][mode][key][chip] for t in ts]  # noqa: B023,E731
            ax.plot(ts, get("dense_ms"), "-o", color=col, label=f"dense {chip}")
            ax.fill_between(ts, get("nsa_shared_ms"), get("nsa_disjoint_ms"), color=col, alpha=0.12)
            ax.plot(ts, get("nsa_shared_ms"), "--", color=col, label=f"NSA {chip}")
        ax.set(xscale="log", yscale="log", xlabel="tokens", title=f"roofline time, {mode}")
        ax.set_xticks(ts, [f"{t // 1024}K" for t in ts])
        ax.minorticks_off()
    axes[0].set_ylabel("ms per layer (B = 1)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Qwen2.5-VL-7B attention (28/4 heads, D 128), VideoNSA (64, 32 blocks, w 256); "
                 "band: NSA selection shared..disjoint")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
