"""Parameter names: our flat NNX state paths <-> Hugging Face safetensors keys.

Pure functions of names and arrays. Our path `language.layers.3.self_attn.q_proj.kernel`
is HF `model.layers.3.self_attn.q_proj.weight` transposed (older layout, as in the official
checkpoints) or `model.language_model.layers.3...` (newer layout). Vision paths `visual.*`
are HF `visual.*` or `model.visual.*`. The Conv3d patch embedding is stored by HF as
`[E, C, T, P, P]` and by us as a `[C*T*P*P, E]` matmul kernel.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx

from nsa_jax.config import ModelConfig


def named_variables(state: nnx.State) -> list[tuple[str, nnx.Variable]]:
    """`(our_path, variable)` for each variable of an NNX state; the one place our paths are
    spelled: state path `('language', 'layers', 3, 'self_attn', 'q_proj', 'kernel')` ->
    `language.layers.3.self_attn.q_proj.kernel`."""
    return [(".".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def our_param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{our_path: (shape, dtype-name)}` of every parameter, without allocating them; per-layer
    names whatever `cfg.scan_layers` says (checkpoints and conversion are per layer)."""
    from nsa_jax.model.vlm import Qwen25VL

    cfg = cfg.replace(scan_layers=False)
    abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    out = {}
    for name, var in named_variables(nnx.state(abstract, nnx.Param)):
        value = var.get_value()
        out[name] = (tuple(value.shape), str(value.dtype))
    return out


def is_gate(path: str) -> bool:
    """Whether our path is an NSA gate parameter (`g_proj_1`, `g_proj_2`; VideoNSA only)."""
    return ".self_attn.g_proj_" in path


def hf_name(path: str, *, layout: str = "old") -> tuple[str, str]:
    """Our path -> (HF key, kind). `layout` "old" (`model.layers`, `visual`) or "new"
    (`model.language_model.layers`, `model.visual`)."""
    parts = path.split(".")
    leaf = parts[-1]
    kind = "plain"
    if leaf == "kernel":
        parts[-1] = "weight"
        kind = "patch" if path.startswith("visual.patch_embed.") else "linear"
    elif leaf == "embedding":
        parts[-1] = "weight"
    name = ".".join(parts)
    name = name.replace("visual.merger.mlp_0.", "visual.merger.mlp.0.")
    name = name.replace("visual.merger.mlp_2.", "visual.merger.mlp.2.")
    if name.startswith("language."):
        rest = name[len("language.") :]
        name = ("model." if layout == "old" else "model.language_model.") + rest
    elif name.startswith("visual.") and layout == "new":
        name = "model." + name
    return name, kind


def hf_candidates(path: str) -> list[tuple[str, str]]:
    """HF keys under which our parameter may be stored (both layouts), with its kind."""
    return [hf_name(path, layout="old"), hf_name(path, layout="new")]


def to_hf_array(
    x: np.ndarray | jax.Array, kind: str, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Our array -> HF layout. `shape` is the HF shape (needed for the patch kernel)."""
    x = np.asarray(x)
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "patch":
        assert shape is not None
        return np.ascontiguousarray(x.T.reshape(shape))
    return x


def from_hf_array(x: np.ndarray | jax.Array, kind: str) -> np.ndarray:
    """HF array -> our layout."""
    x = np.asarray(x)
    if kind == "linear":
        return np.ascontiguousarray(x.T)
    if kind == "patch":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    return x


def hf_shape(our_shape: tuple[int, ...], kind: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The HF shape of a parameter of ours."""
    if kind == "linear":
        return tuple(reversed(our_shape))
    if kind == "patch":
        v = cfg.vision
        return (our_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return our_shape


def ignorable_hf_keys(keys: Iterable[str], cfg: ModelConfig) -> set[str]:
    """HF keys we read past: a tied `lm_head.weight`, rotary buffers."""
    out = set()
    for k in keys:
        if k.endswith("rotary_emb.inv_freq") or (
            cfg.text.tie_word_embeddings and k == "lm_head.weight"
        ):
            out.add(k)
    return out
