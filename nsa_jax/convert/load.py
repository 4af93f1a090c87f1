"""`load_model`: a Hugging Face directory or one of our checkpoints -> a callable model."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.config import ModelConfig
from nsa_jax.convert import checkpoint, hf, names
from nsa_jax.model import stacking
from nsa_jax.model.vlm import Qwen25VL


def model_from_params(
    cfg: ModelConfig, params: dict[str, np.ndarray], dtype: jnp.dtype = jnp.float32
) -> Qwen25VL:
    """Builds the model and fills it with `params` (our flat dict, either layout of the
    decoder layers: `model/stacking.py`), cast to `dtype`."""
    params = stacking.in_layout(cfg, params)
    abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    for name, var in names.named_variables(state):
        if name not in params:
            raise hf.CheckpointError(f"parameter {name!r} missing")
        want, got = tuple(var.get_value().shape), tuple(np.shape(params[name]))
        if got != want:
            raise hf.CheckpointError(
                f"parameter {name!r} has shape {list(got)}, the model expects {list(want)}"
            )
        var.set_value(jnp.asarray(params[name], dtype))
    return nnx.merge(graphdef, state)


def params_of(model: Qwen25VL) -> dict[str, np.ndarray]:
    """The model's parameters as our flat dict of NumPy arrays (per-layer names)."""
    return stacking.unstack_layers({
        name: np.asarray(var.get_value())
        for name, var in names.named_variables(nnx.state(model, nnx.Param))
    })


def load_params(
    path: str | os.PathLike, config: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """A Hugging Face Qwen2.5-VL / VideoNSA directory or our checkpoint directory as
    `(config, {our_path: array})` on the host, arrays in their stored dtype.

    `config` overrides the stored config, e.g. to switch NSA on for a plain Qwen2.5-VL
    checkpoint: gate weights it lacks altogether are then initialised as VideoNSA does
    (`hf.init_gates`), with a warning.

    Raises:
      CheckpointError: a parameter missing (other than all of the gates), unexpected (our
        checkpoints, as the HF path does for tensors) or of another shape than the model's,
        each named.
    """
    path = os.fspath(path)
    if not checkpoint.is_checkpoint(path):
        return hf.read_hf(path, config)
    cfg, params = checkpoint.load_checkpoint(path)
    cfg = config or cfg
    shapes = names.our_param_shapes(cfg)
    missing = [p for p in shapes if p not in params]
    hf.check_missing(missing, shapes, path)
    unexpected = sorted(set(params) - set(shapes))
    if unexpected:
        raise hf.CheckpointError(
            f"{path}: unexpected parameter {unexpected[0]!r} ({len(unexpected)} unexpected "
            f"in all) for architecture {cfg.architecture} with this config"
        )
    misshapen = [p for p in params if tuple(np.shape(params[p])) != shapes[p][0]]
    if misshapen:
        p = misshapen[0]
        raise hf.CheckpointError(
            f"{path}: parameter {p!r} has shape {list(np.shape(params[p]))}, the model expects "
            f"{list(shapes[p][0])}"
        )
    hf.init_gates(params, missing, shapes, path)
    return cfg, params


def load_model(
    path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, *, config: ModelConfig | None = None
) -> Qwen25VL:
    """Loads a Hugging Face Qwen2.5-VL / VideoNSA directory or our checkpoint directory
    (`load_params`, whose errors it raises) as a model.

    The returned model is called like transformers' forward:
    `model(input_ids, attention_mask=..., pixel_values=..., image_grid_thw=...,
    pixel_values_videos=..., video_grid_thw=..., second_per_grid_ts=...)` -> logits
    `[B, T, vocab]`.
    """
    cfg, params = load_params(path, config)
    return model_from_params(cfg, params, dtype)
