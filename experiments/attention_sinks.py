"""Attention sinks: the share of attention mass on the first block of the sequence, and the
share carried by compressed blocks, per layer, for a trained VideoNSA and its dense twin.

The paper (VideoNSA, finding 4): learned gates make dynamic attention sinks; compression makes
the most, selection almost none (about 0.3% overall). Measured here over the video queries of
held-out questions (`experiments/nsa_probe.py` recomputes each branch's distribution from the
layer's own projections):
- `first_block`: mean attention mass a video query puts on the first `block_size` tokens
  (the system prompt and the start of the row), per branch (compressed: the first compressed
  block's probability; selected; window) and for the gate-weighted NSA mix
  `sum_b g_b p_b / sum_b g_b`; for the dense twin, its causal softmax. `uniform` is what
  attention spread evenly over the visible tokens would put there.
- `compressed_share`: the compressed branch's share of the gates, `g_cmp / sum_b g_b`.

    nsa-jax demo --out demo_out
    python experiments/attention_sinks.py --ckpt demo_out/videonsa/model \\
        --dense-ckpt demo_out/dense/model --data demo_out/data/eval --samples 20
    python experiments/attention_sinks.py --quick --out DIR   # CPU smoke run: random init
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from nsa_jax.demo import TASKS  # noqa: E402

import nsa_probe  # noqa: E402

KEYS = ("dense", "cmp", "slc", "swa", "nsa_mix", "uniform")


def layer_stats(cap: nsa_probe.LayerCapture) -> dict[str, float]:
    """Mean first-block mass over the video queries (and heads) of one captured layer."""
    attn = cap.attn
    cfg = getattr(attn, "nsa", None)
    maps = nsa_probe.attention_maps(attn, cap.x, cap.li, cfg)
    video = np.asarray(cap.li.is_video)[0]
    t = video.shape[0]
    block = cfg.block_size if cfg is not None else BLOCK
    first = slice(0, block)
    rows = np.flatnonzero(video)
    out = {"dense": float(maps["dense"][rows][..., first].sum(-1).mean()),
           "uniform": float(np.mean([min(block, r + 1) / (r + 1) for r in rows]))}
    if cfg is None:
        return out
    g = nsa_probe.gates(attn, cap.x)[rows]  # [Tv, Hq, 3]
    for name in ("cmp", "slc", "swa"):
        out[name] = float(maps[name][rows][..., first].sum(-1).mean())
    # the first compressed block's own probability (rows that see no block yet count 0)
    out["cmp_block0"] = float(maps["cmp_blocks"][rows][..., 0].mean())
    mix = sum(g[..., i, None] * maps[n][rows] for i, n in enumerate(("cmp", "slc", "swa")))
    mix = mix / g.sum(-1, keepdims=True)
    out["nsa_mix"] = float(mix[..., first].sum(-1).mean())
    out["compressed_share"] = float((g[..., 0] / g.sum(-1)).mean())
    out["tokens"] = int(t)
    return out


BLOCK = 16  # the dense twin has no NSA config: its "first block" is the hybrid model's


def measure(ckpt: str, data: str, samples: int) -> list[dict[str, Any]]:
    """Per layer, the stats averaged over the first `samples` questions of every task."""
    qa = nsa_probe.load_qa(ckpt)
    per_layer: list[list[dict[str, float]]] = []
    for task in TASKS:
        for video, prompt, _ in nsa_probe.questions(data, task, samples):
            for i, cap in enumerate(nsa_probe.capture(qa.model, qa.inputs(video, prompt))):
                while len(per_layer) <= i:
                    per_layer.append([])
                per_layer[i].append(layer_stats(cap))
    return [{k: float(np.mean([s[k] for s in layer])) for k in layer[0]} for layer in per_layer]


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nsa, dense = result["videonsa"], result.get("dense")
    layers = np.arange(len(nsa))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    series = [("NSA compressed", [r["cmp"] for r in nsa]),
              ("NSA selected", [r["slc"] for r in nsa]),
              ("NSA window", [r["swa"] for r in nsa]),
              ("NSA gated mix", [r["nsa_mix"] for r in nsa])]
    if dense:
        series.append(("dense twin", [r["dense"] for r in dense]))
    series.append(("uniform", [r["uniform"] for r in nsa]))
    w = 0.8 / len(series)
    for j, (name, vals) in enumerate(series):
        ax1.bar(layers + (j - (len(series) - 1) / 2) * w, 100 * np.asarray(vals), w, label=name)
    ax1.set_xticks(layers, [f"layer {i}" for i in layers])
    ax1.set_ylabel("attention mass on the first block (%)")
    ax1.legend(fontsize=7)
    ax2.bar(layers, [100 * r["compressed_share"] for r in nsa], 0.5, color="tab:blue")
    ax2.axhline(100 / 3, color="k", lw=0.8, ls="--")
    ax2.set_xticks(layers, [f"layer {i}" for i in layers])
    ax2.set_ylabel("compressed gate share (%)")
    ax2.set_ylim(0, 100)
    fig.suptitle("Attention sinks: video queries of held-out questions (dashed: 1/3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = nsa_probe.probe_parser(__doc__.split("\n\n")[0], dense=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        nsa_probe.probe_inputs(p, args, tmp)
        result: dict[str, Any] = {"videonsa": measure(args.ckpt, args.data, args.samples)}
        if args.dense_ckpt:
            result["dense"] = measure(args.dense_ckpt, args.data, args.samples)
    result.update(command=" ".join(["python", "experiments/attention_sinks.py", *sys.argv[1:]]),
                  ckpt=args.ckpt, dense_ckpt=args.dense_ckpt, samples=args.samples,
                  quick=args.quick, wall_s=time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_sinks.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "attention_sinks.png")
    for name in ("videonsa", "dense"):
        for i, r in enumerate(result.get(name, [])):
            print(name, f"layer {i}", " ".join(f"{k} {100 * v:.1f}%" for k, v in r.items()
                                               if k != "tokens"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
