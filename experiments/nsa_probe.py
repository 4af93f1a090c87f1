"""Reading a model's attention from outside the model code (for `branch_usage.py` and
`attention_sinks.py`).

`capture(model, inputs)` runs the model's own forward once, eagerly, with each decoder layer's
attention module wrapped by a recorder that keeps its input (the normed hidden states `x` and
the layer inputs: mRoPE tables, video mask); the model code is untouched. From a capture:
- `gates(attn, x)`: the layer's NSA gates `[T, Hq, 3]` (compressed, selected, window), as the
  layer computes them (`g_proj_2(gelu(g_proj_1(x)))`, `sigmoid(logits / temperature)`);
- `attention_maps(attn, x, li)`: per query the attention distributions over keys of dense
  causal attention and of the three NSA branches, recomputed from the layer's projections with
  the reference's public functions for compression and block selection
  (`pallas_kernels.reference`), so they are the distributions the layer's NSA uses.
One row (batch 1), no padding: what a question about one video gives.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.attention.hybrid import gate_values
from nsa_jax.model import rope
from nsa_jax.model.inputs import prepare
from nsa_jax.model.layers import activation
from pallas_kernels.reference import NSAConfig, compress_kv, compressed_attention, select_blocks

Array = jax.Array


@dataclasses.dataclass
class LayerCapture:
    """One decoder layer's attention input: `attn` the module, `x: [1, T, H]`, `li` its
    layer inputs (`cos, sin: [1, T, D]`, `is_video: [1, T]`)."""

    attn: Any
    x: Array
    li: Any


class _Recorder:
    """Stands in for a layer's `self_attn` during one eager forward: records, then delegates."""

    def __init__(self, inner: Any, out: list[LayerCapture]) -> None:
        self.inner, self.out = inner, out

    def __call__(self, x: Array, li: Any, *args: Any, **kw: Any) -> Array:
        self.out.append(LayerCapture(self.inner, x, li))
        return self.inner(x, li, *args, **kw)


def capture(model: Any, inputs: dict[str, Any]) -> list[LayerCapture]:
    """Every decoder layer's attention input for one forward of `model` on `inputs` (the
    transformers-style arrays `VideoQA.inputs` returns)."""
    prepared = prepare(model.cfg, **inputs)
    layers = list(model.language.layers)
    out: list[LayerCapture] = []
    originals = [layer.self_attn for layer in layers]
    try:
        for layer, attn in zip(layers, originals, strict=True):
            object.__setattr__(layer, "self_attn", _Recorder(attn, out))
        jax.block_until_ready(model.forward(**prepared, return_hidden=True))
    finally:
        for layer, attn in zip(layers, originals, strict=True):
            object.__setattr__(layer, "self_attn", attn)
    return out


def gates(attn: Any, x: Array) -> np.ndarray:
    """The layer's NSA gates `[T, Hq, 3]` for row 0 (None-free: the layer must be hybrid)."""
    b, t, _ = x.shape
    logits = attn.g_proj_2(activation("gelu", attn.g_proj_1(x))).reshape(b, t, attn.heads, 3)
    return np.asarray(gate_values(logits, attn.attention.nsa.gate_temperature))[0]


def _qk(attn: Any, x: Array, li: Any) -> tuple[Array, Array, Array]:
    b, t, _ = x.shape
    q = attn.q_proj(x).reshape(b, t, attn.heads, attn.head_dim)
    k = attn.k_proj(x).reshape(b, t, attn.kv_heads, attn.head_dim)
    v = attn.v_proj(x).reshape(b, t, attn.kv_heads, attn.head_dim)
    return rope.apply_rope(q, li.cos, li.sin), rope.apply_rope(k, li.cos, li.sin), v


def _softmax(s: Array, mask: Array) -> Array:
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


def attention_maps(attn: Any, x: Array, li: Any, cfg: NSAConfig | None) -> dict[str, np.ndarray]:
    """`branch_maps` of one captured layer (its projections and RoPE applied to `x`)."""
    q, k, v = _qk(attn, x, li)
    return branch_maps(q, k, v, cfg)


def branch_maps(q: Array, k: Array, v: Array, cfg: NSAConfig | None) -> dict[str, np.ndarray]:
    """Attention distributions of row 0 of `q: [1, T, Hq, D]`, `k, v: [1, T, Hkv, D]`, each
    `[T, Hq, T]` over key tokens (f32): "dense" (causal softmax over every earlier token, what
    a text query or the dense twin uses), and with `cfg` the NSA branches: "cmp" (the
    compressed-block distribution spread evenly over each block's tokens, as mean pooling
    weighs them), "slc" (over the tokens of the selected blocks), "swa" (over the window);
    plus "cmp_blocks" `[T, Hq, Nc]`. `sum_b g_b (maps[b] @ v)` is the layer's NSA output."""
    _, t, hq, d = q.shape
    g = hq // k.shape[2]
    scale = d**-0.5
    kh = jnp.repeat(k, g, axis=2)  # query head h reads KV head h // g
    s = jnp.einsum("thd,shd->ths", q[0].astype(jnp.float32), kh[0].astype(jnp.float32)) * scale
    pos = jnp.arange(t)
    causal = (pos[None, :] <= pos[:, None])[:, None, :]
    out = {"dense": np.asarray(_softmax(s, causal))}
    if cfg is None:
        return out
    if cfg.compression != "mean":
        raise ValueError("branch_maps reads mean-pooled compression only")
    k_cmp, _ = compress_kv(k, v, cfg)
    nc = k_cmp.shape[1]
    kc = jnp.repeat(k_cmp, g, axis=2)[0]  # [Nc, Hq, D]
    sc = jnp.einsum("thd,nhd->thn", q[0].astype(jnp.float32), kc.astype(jnp.float32)) * scale
    ends = jnp.arange(nc) * cfg.cmp_stride + cfg.cmp_block - 1
    vis = (ends[None, :] <= pos[:, None])[:, None, :]  # a block is seen once it has ended
    p_blocks = _softmax(sc, vis)
    starts = np.arange(nc) * cfg.cmp_stride
    cover = np.zeros((nc, t), np.float32)  # block c -> its tokens, weight 1 / tokens present
    for c, s0 in enumerate(starts):
        n = min(cfg.cmp_block, t - s0)
        cover[c, s0 : s0 + n] = 1.0 / n
    out["cmp_blocks"] = np.asarray(p_blocks)
    out["cmp"] = np.asarray(jnp.einsum("thn,ns->ths", p_blocks, jnp.asarray(cover)))
    _, lse = compressed_attention(q, k_cmp, k_cmp, cfg)
    idx = np.asarray(select_blocks(q, k_cmp, lse, cfg))[0]  # [T, Hkv, n]
    sel = np.zeros((t, k.shape[2], t), bool)
    for blk in range(idx.shape[-1]):
        b_i = idx[..., blk]
        tok = b_i[..., None] * cfg.block_size + np.arange(cfg.block_size)  # [T, Hkv, l']
        ok = (b_i[..., None] >= 0) & (tok < t)
        ti, hi, _ = np.nonzero(ok)
        sel[ti, hi, tok[ok]] = True
    sel_q = np.repeat(sel, g, axis=1) & np.asarray(causal)
    out["slc"] = np.asarray(_softmax(s, jnp.asarray(sel_q)))
    if cfg.window:
        band = causal & (pos[None, :] > pos[:, None] - cfg.window)[:, None, :]
        out["swa"] = np.asarray(_softmax(s, band))
    else:
        out["swa"] = np.zeros_like(out["dense"])
    return out


# ------------------------------------------------------------------------- models and data


def load_qa(ckpt: str) -> Any:
    """A checkpoint (e.g. `nsa-jax demo`'s `OUT/videonsa/model`) as `VideoQA` in f32, sampling
    videos as its training run did (the run's `config.yaml` beside the checkpoint: a demo run
    with longer videos samples more frames), else as the `demo` config does."""
    import os

    from nsa_jax.demo import sampling
    from nsa_jax.eval.video_qa import VideoQA

    run_dir = os.path.dirname(os.path.abspath(ckpt))
    has_run = os.path.exists(os.path.join(run_dir, "config.yaml"))
    return VideoQA(ckpt, dtype="float32", sampling=sampling(run_dir if has_run else None))


def questions(data_dir: str, task: str, limit: int) -> list[tuple[str, str, str]]:
    """The first `limit` held-out `(video, prompt, answer)` of a task in a demo data
    directory (`OUT/data/eval`), read by the evaluation's own loader."""
    import os

    from nsa_jax.eval.tasks import get_task, load_samples

    samples = load_samples(get_task(task), os.path.join(data_dir, f"{task}.jsonl"), data_dir,
                           limit=limit)
    return [(s.video, s.prompt, str(s.answer)) for s in samples]


def quick_setup(root: str, videos_per_task: int = 2) -> dict[str, str]:
    """For `--quick` runs: randomly initialised `demo`-config models (hybrid and dense twin)
    saved as checkpoints, and a few synthetic videos per task. Returns their paths."""
    import os

    from nsa_jax.convert.checkpoint import EXTRA, save_checkpoint
    from nsa_jax.convert.load import params_of
    from nsa_jax.data import synthetic
    from nsa_jax.data.tokenizer import build_qwen_tokenizer
    from nsa_jax.demo import TASKS, video_config
    from nsa_jax.model.vlm import init_model
    from nsa_jax.train.config import CONFIGS

    cfg = CONFIGS["demo"].model
    tok = build_qwen_tokenizer()
    paths = {}
    for name, c in (("videonsa", cfg), ("dense", cfg.with_attention(nsa=None))):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            save_checkpoint(path, c, params_of(init_model(c, seed=0)))
            os.makedirs(os.path.join(path, EXTRA), exist_ok=True)
            tok.save(os.path.join(path, EXTRA, "tokenizer.json"))
        paths[name] = path
    data = os.path.join(root, "data")
    for i, task in enumerate(TASKS):
        if not os.path.exists(os.path.join(data, f"{task}.jsonl")):
            synthetic.write_dataset(data, task=task, num_videos=videos_per_task,
                                    cfg=video_config(), seed=i)
    paths["data"] = data
    return paths


FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def probe_parser(description: str, *, dense: bool = False) -> argparse.ArgumentParser:
    """The command line every probe experiment shares: a trained checkpoint (and, with
    `dense`, its dense twin), held-out data, questions per task, output folder, `--quick`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--ckpt", help="a trained VideoNSA checkpoint (nsa-jax demo's videonsa/model)")
    if dense:
        p.add_argument("--dense-ckpt", help="its dense twin (nsa-jax demo's dense/model)")
    p.add_argument("--data", help="held-out synthetic data (nsa-jax demo's data/eval)")
    p.add_argument("--samples", type=int, default=20, help="questions per task")
    p.add_argument("--out", type=Path, default=FIGURES)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: random init, 1 video")
    return p


def probe_inputs(p: argparse.ArgumentParser, args: argparse.Namespace, tmp: str) -> None:
    """Fills `args` for `--quick` (random checkpoints and one video per task under `tmp`), or
    refuses a run without a checkpoint and data."""
    if args.quick:
        paths = quick_setup(tmp, videos_per_task=1)
        args.ckpt, args.data, args.samples = paths["videonsa"], paths["data"], 1
        if hasattr(args, "dense_ckpt"):
            args.dense_ckpt = paths["dense"]
    elif not (args.ckpt and args.data):
        p.error("--ckpt and --data are required (or --quick)")
