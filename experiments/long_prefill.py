"""Long prefill: up to an hour of video at 2 fps (~1M tokens) through the 7B shape on one GPU,
the hybrid model against its dense twin (issue 32).

A prompt is one video of 448 x 448 frames (32 x 32 patches: 256 tokens a temporal patch of two
frames) with text around it (long text before it, the question after it): `--video-fraction`
of the tokens are video, the temporal patches a multiple of the tower's chunk (`--chunk`), so
every tower call has one shape. Random weights in bf16 through `nsa_jax.prefill.prefill`, the
code `nsa-jax generate` runs (real weights take the same path), pixels random (a fixed block
reused: the decoder's cost does not depend on them).

`--variant hybrid` (one process, lengths ascending, so the allocator's peak after a length is
that length's): the whole prefill, the vision tower and then each layer waited for and timed.
A length's first layer compiles: `prefill_s` = tower + the median of the other layers x the
depth (the steady cost; `wall_s` includes the compile). After the longest length, decoding:
the first answer token (`ttft_s` = `prefill_s` + its sampling) and the median time per decoded
token over the cache.

`--variant dense` (its own process): the dense twin (NSA off; cuDNN attention, the same token
chunks) with only `--dense-layers` decoder layers: its second layer's time x the depth, plus
the hybrid run's tower time (the same tower), gives `prefill_s`; its peak is measured with
those layers and projected to full depth by adding each further layer's weights and cache.

    python experiments/long_prefill.py --variant hybrid --lengths 131072,262144,524288,1048576
    python experiments/long_prefill.py --variant dense --lengths 131072,262144,524288,1048576
    python experiments/long_prefill.py --report          # long_prefill.json + .png
    python experiments/long_prefill.py --quick --out DIR  # CPU smoke: all three, tiny model

Writes `long_prefill_<variant>.json` per variant and the merged `long_prefill.json` and
`long_prefill.png` under `--out` (default `docs/figures/`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"
LENGTHS = "131072,262144,524288,1048576"
QUICK_LENGTHS = "1024,2048"


@dataclasses.dataclass(frozen=True)
class RandomPatches:
    """`[rows, patch_dim]` pixel rows, any slice answered from one fixed random block."""

    shape: tuple[int, int]
    block: np.ndarray

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return self.block[: stop - start]


def model_config(args: argparse.Namespace) -> Any:
    from nsa_jax.config import preset

    cfg = preset(args.preset)
    if args.quick:  # the tiny model with NSA blocks that fit a 1K-token prompt
        cfg = preset("tiny").with_attention(
            nsa=dataclasses.replace(cfg.nsa, block_size=16, num_selected=4, window=32)
        )
    return cfg


def prompt(cfg: Any, length: int, frame: int, chunk: int, video_fraction: float) -> dict:
    """Token ids `[1, length]` (text, `<|vision_start|>`, the video, `<|vision_end|>`, a
    16-token question) and the video's grid `[1, 3]`."""
    per_t = frame * frame // cfg.vision.spatial_merge_size**2
    t = max(chunk, int(video_fraction * length) // per_t // chunk * chunk)
    question = 16
    before = length - t * per_t - question - 2
    if before < 1:
        raise ValueError(f"length {length} cannot hold {t} temporal patches of {per_t} tokens")
    rng = np.random.default_rng(0)
    vocab = min(cfg.text.vocab_size, cfg.vision_start_token_id)
    ids = np.concatenate(
        [
            rng.integers(0, vocab, before),
            [cfg.vision_start_token_id],
            np.full(t * per_t, cfg.video_token_id),
            [cfg.vision_end_token_id],
            rng.integers(0, vocab, question),
        ]
    ).astype(np.int32)[None]
    return {"input_ids": ids, "grid": np.asarray([[t, frame, frame]], np.int64)}


def peak_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use", 0) / 2**30


def prefill_case(
    model: Any, length: int, args: argparse.Namespace, layers: list | None = None
) -> tuple[dict, Any, Any, Any]:
    """One prefill at `length` tokens, timed by phase; returns its record, the logits, the
    cache and the prepared inputs."""
    import jax.numpy as jnp

    from nsa_jax.generate import cache_length
    from nsa_jax.model.inputs import prepare
    from nsa_jax.prefill import Visual, prefill

    cfg = model.cfg
    p = prompt(cfg, length, args.frame, args.chunk, args.video_fraction)
    prepared = prepare(model.cfg, p["input_ids"], video_grid_thw=p["grid"])
    rows = int(p["grid"].prod())
    block = np.random.default_rng(1).standard_normal(
        (args.chunk * args.frame**2, cfg.vision.patch_dim), np.float32
    )
    videos = Visual(RandomPatches((rows, cfg.vision.patch_dim), block), p["grid"])
    phases: list[tuple[str, float]] = []
    start = time.perf_counter()
    logits, cache = prefill(
        model,
        prepared["input_ids"],
        prepared["position_ids"],
        None,
        None,
        videos,
        cache_length(length, args.decode_steps + 1),
        prepared["text_rows"],
        vision_patches=args.chunk * args.frame**2,
        cache_dtype=jnp.bfloat16,
        on_phase=lambda name, s: phases.append((name, s)),
    )
    logits.block_until_ready()
    wall = time.perf_counter() - start
    vision = sum(s for n, s in phases if n == "vision")
    layer_s = [s for n, s in phases if n == "layer"]
    video_tokens = int((p["input_ids"] == cfg.video_token_id).sum())
    rec = {
        "length": length,
        "video_tokens": video_tokens,
        "video_fraction": video_tokens / length,
        "frames": int(p["grid"][0, 0]) * cfg.vision.temporal_patch_size,
        "text_rows": prepared["text_rows"],
        "wall_s": wall,
        "vision_s": vision,
        "layer_s": layer_s,
        "layers": cfg.text.num_hidden_layers,
    }
    return rec, logits, cache, prepared


def steady_layer(layer_s: list[float]) -> float:
    """A layer's time without compiling: the median of all but the first (which compiles)."""
    return float(np.median(layer_s[1:] if len(layer_s) > 1 else layer_s))


def decode_case(model: Any, logits: Any, cache: Any, prepared: dict, steps: int) -> dict:
    """Greedy decoding of `steps` tokens over the cache: the first token's sampling and the
    median time of the decode steps after the first (which compiles)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nsa_jax.generate import jit_decode, jit_sample

    t = prepared["input_ids"].shape[1]
    length = cache[0][0].shape[1]
    graphdef, state = nnx.split(model)
    greedy = dict(temperature=jnp.float32(0), top_k=jnp.int32(0), top_p=jnp.float32(1))
    key = jax.random.PRNGKey(0)
    jit_sample(logits, key, **greedy).block_until_ready()  # compiles
    start = time.perf_counter()
    tokens = jit_sample(logits, key, **greedy).block_until_ready()
    first = time.perf_counter() - start
    key_mask = jnp.asarray(np.arange(length)[None] < t)
    pos = int(np.asarray(prepared["position_ids"]).max()) + 1
    times = []
    for s in range(steps):
        start = time.perf_counter()
        tokens, _, cache, key_mask = jit_decode(
            graphdef,
            state,
            tokens,
            jnp.asarray([pos + s], jnp.int32),
            cache,
            key_mask,
            jnp.int32(t + s),
            key,
            **greedy,
        )
        tokens.block_until_ready()
        times.append(time.perf_counter() - start)
    return {
        "first_token_sample_s": first,
        "decode_step_s": float(np.median(times[1:])),
        "decode_first_step_s": times[0],
    }


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def run_hybrid(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nsa_jax.model.vision import VisionInputs
    from nsa_jax.model.vlm import init_model
    from nsa_jax.prefill import jit_tower

    cfg = model_config(args)
    t0 = time.perf_counter()
    model = init_model(cfg, dtype=jnp.bfloat16)
    out = {
        "variant": "hybrid",
        "config": args.preset,
        "device": jax.devices()[0].device_kind,
        "init_s": time.perf_counter() - t0,
        "command": " ".join(sys.argv),
        "rows": [],
    }
    lengths = [int(x) for x in args.lengths.split(",")]
    # compiles the tower's chunk (one shape for every length), as `prefill` will call it
    graphdef, state = nnx.split(model.visual)
    grid = np.asarray([[args.chunk, args.frame, args.frame]])
    inputs = jax.tree.map(jnp.asarray, VisionInputs.from_grid(grid, cfg.vision))
    block = np.zeros((args.chunk * args.frame**2, cfg.vision.patch_dim), np.float32)
    t0 = time.perf_counter()
    jit_tower(graphdef, state, jnp.asarray(block), inputs).block_until_ready()
    out["tower_compile_s"] = time.perf_counter() - t0
    for n, length in enumerate(lengths):
        try:
            rec, logits, cache, prepared = prefill_case(model, length, args)
            rec["prefill_s"] = rec["vision_s"] + steady_layer(rec["layer_s"]) * rec["layers"]
            rec["tokens_per_s"] = length / rec["prefill_s"]
            rec["peak_memory_gib"] = peak_gib()
            rec["cache_gib"] = sum(a.nbytes for kv in cache for a in kv) / 2**30
            if n == len(lengths) - 1:
                rec.update(decode_case(model, logits, cache, prepared, args.decode_steps))
                rec["ttft_s"] = rec["prefill_s"] + rec["first_token_sample_s"]
            del logits, cache
        except Exception as e:  # out of memory at this length: recorded, the sweep goes on
            rec = {"length": length, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        out["rows"].append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "layer_s"}), flush=True)
        write(Path(args.out) / "long_prefill_hybrid.json", out)


def run_dense(args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nsa_jax.model.inputs import prepare
    from nsa_jax.model.vlm import init_model
    from nsa_jax.prefill import jit_embed, jit_prefill_layer

    full = model_config(args).with_attention(nsa=None)
    cfg = full.replace(text=dataclasses.replace(full.text, num_hidden_layers=args.dense_layers))
    model = init_model(cfg, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(next(model.language.layer_states())[1]))
    out = {
        "variant": "dense",
        "config": args.preset,
        "device": jax.devices()[0].device_kind,
        "layers_run": args.dense_layers,
        "layers": full.text.num_hidden_layers,
        "command": " ".join(sys.argv),
        "rows": [],
    }
    t = full.text
    for length in (int(x) for x in args.lengths.split(",")):
        try:
            p = prompt(cfg, length, args.frame, args.chunk, args.video_fraction)
            prepared = prepare(model.cfg, p["input_ids"], video_grid_thw=p["grid"])
            _, li = jit_embed(
                graphdef,
                state,
                prepared["input_ids"],
                prepared["position_ids"],
                None,
                prepared["text_rows"],
            )
            x = (
                jax.random.normal(jax.random.PRNGKey(0), (1, length, t.hidden_size)) * 0.02
            ).astype(jnp.bfloat16)
            layer_s = []
            for lg, ls in model.language.layer_states():
                start = time.perf_counter()
                x, kv = jit_prefill_layer(lg, ls, x, li, length, jnp.dtype(jnp.bfloat16), 8192)
                x.block_until_ready()
                layer_s.append(time.perf_counter() - start)
                del kv
            del x
            cache_layer = 2 * length * t.num_key_value_heads * t.head_dim * 2
            peak = peak_gib()
            rec = {
                "length": length,
                "layer_s": layer_s,
                "layer_steady_s": steady_layer(layer_s),
                "peak_memory_gib_layers_run": peak,
                "peak_memory_gib": None
                if peak is None
                else peak
                + (full.text.num_hidden_layers - args.dense_layers)
                * (layer_bytes + cache_layer)
                / 2**30,
            }
        except Exception as e:
            rec = {"length": length, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        out["rows"].append(rec)
        print(json.dumps(rec), flush=True)
        write(Path(args.out) / "long_prefill_dense.json", out)


def report(args: argparse.Namespace) -> None:
    """Merges the two variants: the dense twin's prefill = the hybrid's tower + its steady
    layer x the depth; ratios; writes long_prefill.json and the plot."""
    d = Path(args.out)
    hybrid = json.loads((d / "long_prefill_hybrid.json").read_text())
    dense = json.loads((d / "long_prefill_dense.json").read_text())
    by_len = {r["length"]: r for r in dense["rows"] if "error" not in r}
    rows = []
    for h in hybrid["rows"]:
        row = {"length": h["length"], "hybrid": h}
        dn = by_len.get(h["length"])
        if dn is not None and "error" not in h:
            s = h["vision_s"] + dn["layer_steady_s"] * dense["layers"]
            row["dense"] = {**dn, "prefill_s": s, "tokens_per_s": h["length"] / s}
            row["speedup"] = s / h["prefill_s"]
        rows.append(row)
    merged = {
        "device": hybrid["device"],
        "config": hybrid["config"],
        "hybrid_command": hybrid["command"],
        "dense_command": dense["command"],
        "rows": rows,
    }
    write(d / "long_prefill.json", merged)
    for r in rows:
        h, dn = r["hybrid"], r.get("dense", {})
        if "error" in h:
            print(f"{r['length']:>8}  hybrid: {h['error'][:80]}")
            continue
        print(
            f"{r['length']:>8}  hybrid {h['prefill_s']:7.2f} s {h['tokens_per_s']:9.0f} tok/s "
            f"peak {h['peak_memory_gib'] or 0:6.1f} GiB | dense {dn.get('prefill_s', 0):8.2f} s"
            f" | {r.get('speedup', 0):.2f}x"
        )
    plot(rows, d / "long_prefill.png", f"{hybrid['config']} prefill, {hybrid['device']}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ok = [r for r in rows if "error" not in r["hybrid"]]
    x = [r["length"] / 1024 for r in ok]
    a.plot(x, [r["hybrid"]["prefill_s"] for r in ok], "o-", label="hybrid (NSA)")
    dn = [r for r in ok if "dense" in r]
    a.plot(
        [r["length"] / 1024 for r in dn],
        [r["dense"]["prefill_s"] for r in dn],
        "s--",
        label="dense twin (cuDNN)",
    )
    a.set(xlabel="prompt (K tokens)", ylabel="prefill (s)", xscale="log", yscale="log")
    a.legend()
    b.plot(x, [r["hybrid"]["tokens_per_s"] / 1e3 for r in ok], "o-", label="hybrid")
    b.plot(
        [r["length"] / 1024 for r in dn],
        [r["dense"]["tokens_per_s"] / 1e3 for r in dn],
        "s--",
        label="dense twin",
    )
    b.set(xlabel="prompt (K tokens)", ylabel="K tokens / s", xscale="log")
    for r in ok:
        if r["hybrid"].get("peak_memory_gib"):
            b.annotate(
                f"{r['hybrid']['peak_memory_gib']:.0f} GiB",
                (r["length"] / 1024, r["hybrid"]["tokens_per_s"] / 1e3),
                fontsize=8,
            )
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variant", choices=("hybrid", "dense"))
    p.add_argument("--report", action="store_true", help="merge the variants' files and plot")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: the tiny model, both variants and the report",
    )
    p.add_argument("--preset", default="videonsa-7b-clean")
    p.add_argument("--lengths", default=None, help=f"tokens (default {LENGTHS})")
    p.add_argument("--frame", type=int, default=32, help="patches a frame side (448 px: 32)")
    p.add_argument("--chunk", type=int, default=32, help="temporal patches a tower call")
    p.add_argument("--video-fraction", type=float, default=0.97)
    p.add_argument("--dense-layers", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--out", default=str(FIGURES))
    args = p.parse_args(argv)
    if args.quick:
        args.lengths = args.lengths or QUICK_LENGTHS
        args.frame, args.chunk, args.decode_steps = 4, 8, 4
        for variant in ("hybrid", "dense"):
            (run_hybrid if variant == "hybrid" else run_dense)(args)
        report(args)
        return 0
    args.lengths = args.lengths or LENGTHS
    if args.report:
        report(args)
    elif args.variant == "hybrid":
        run_hybrid(args)
    elif args.variant == "dense":
        run_dense(args)
    else:
        p.error("give --variant, --report or --quick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
