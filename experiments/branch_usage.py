"""Branch usage: the mean NSA gate of each branch (compressed, selected, window) per layer and
per task, over the video queries of held-out questions, for a trained VideoNSA.

The paper (VideoNSA, finding 3): branch use depends on the task, and the compressed branch
dominates at every depth. Gates are `sigmoid(MLP(x) / 0.3)` per query token and head, read
from the layer's own gate MLP on the hidden states of the model's forward
(`experiments/nsa_probe.py`); they start at 0.5 (zero-initialised biases, small weights).

    nsa-jax demo --out demo_out                      # trains the model (or any checkpoint)
    python experiments/branch_usage.py --ckpt demo_out/videonsa/model \\
        --data demo_out/data/eval --samples 20       # -> docs/figures/branch_usage.{json,png}
    python experiments/branch_usage.py --quick --out DIR   # CPU smoke run: random init
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

BRANCHES = ("compressed", "selected", "window")


def measure(ckpt: str, data: str, samples: int) -> dict[str, Any]:
    """`{"gates": {task: [layers][3] means}, "per_head": ...}` over every video query of the
    first `samples` held-out questions of each task."""
    qa = nsa_probe.load_qa(ckpt)
    if qa.model.cfg.nsa is None:
        raise ValueError(f"{ckpt} has no NSA layers: no gates to read")
    out: dict[str, Any] = {"gates": {}, "std": {}, "questions": {}}
    for task in TASKS:
        per_layer: list[list[np.ndarray]] = []
        qs = nsa_probe.questions(data, task, samples)
        for video, prompt, _ in qs:
            caps = nsa_probe.capture(qa.model, qa.inputs(video, prompt))
            for i, c in enumerate(caps):
                if getattr(c.attn, "nsa", None) is None:
                    continue
                video_rows = np.asarray(c.li.is_video)[0]
                g = nsa_probe.gates(c.attn, c.x)[video_rows]  # [Tv, Hq, 3]
                while len(per_layer) <= i:
                    per_layer.append([])
                per_layer[i].append(g.reshape(-1, 3))
        out["gates"][task] = [np.concatenate(x).mean(0).tolist() for x in per_layer]
        out["std"][task] = [np.concatenate(x).std(0).tolist() for x in per_layer]
        out["questions"][task] = len(qs)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["gates"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), sharey=True)
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        g = np.asarray(result["gates"][task])  # [L, 3]
        x = np.arange(g.shape[0])
        for j, name in enumerate(BRANCHES):
            ax.bar(x + (j - 1) * 0.27, g[:, j], 0.27, label=name)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, [f"layer {i}" for i in x])
        ax.set_ylim(0, 1)
        ax.set_title(task)
    np.atleast_1d(axes)[0].set_ylabel("mean gate (video queries)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle("NSA branch usage after training (dashed: the initial 0.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = nsa_probe.probe_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        nsa_probe.probe_inputs(p, args, tmp)
        result = measure(args.ckpt, args.data, args.samples)
    result.update(command=" ".join(["python", "experiments/branch_usage.py", *sys.argv[1:]]),
                  ckpt=args.ckpt, quick=args.quick, wall_s=time.perf_counter() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "branch_usage.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "branch_usage.png")
    for task, g in result["gates"].items():
        print(task, " | ".join(f"layer {i}: " + " ".join(f"{b[:3]} {v:.3f}"
                                                          for b, v in zip(BRANCHES, layer,
                                                                          strict=True))
                              for i, layer in enumerate(g)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
