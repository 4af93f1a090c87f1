"""Our checkpoint format: an orbax checkpoint of the flat parameter dict plus the config.

Layout of `CKPT/`:
  `config.json`  the model config in Hugging Face form (`ModelConfig.to_hf`, NSA under "nsa");
  `params/`      orbax (`StandardCheckpointer`) of `{our_path: array}`;
  `hf_extra/`    tokenizer / processor files carried over from the source HF directory.
Written atomically: into a temporary sibling directory renamed into place at the end.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from nsa_jax.config import ModelConfig
from nsa_jax.convert.hf import atomic_directory, copy_extra_files

PARAMS = "params"
EXTRA = "hf_extra"


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS))


def save_checkpoint(
    path: str, cfg: ModelConfig, params: dict[str, np.ndarray], *, extra_from: str | None = None
) -> None:
    """Writes `params` (flat dict, stored dtypes kept) and `cfg` to the new directory `path`
    (absent or empty).

    Holds no copy of `params`: the checkpoint is written from the arrays themselves. Atomic:
    written to a temporary sibling renamed to `path` at the end, so a failed run leaves no
    directory with a config but partial params."""
    with atomic_directory(path) as tmp:
        _write_checkpoint_files(tmp, cfg, params, extra_from)


def _write_checkpoint_files(
    path: str, cfg: ModelConfig, params: dict[str, np.ndarray], extra_from: str | None
) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    # orbax deep-copies NumPy arrays before writing unless told not to: that copy would double
    # the memory of a conversion (a 7B model would no longer fit in 24 GiB)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    tree = {k: np.asarray(v) for k, v in params.items()}
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.join(path, PARAMS), args=ocp.args.PyTreeSave(tree))
    if extra_from is not None:
        copy_extra_files(extra_from, os.path.join(path, EXTRA))


def load_checkpoint(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Reads `(cfg, {our_path: array})` from a directory written by `save_checkpoint`."""
    path = os.path.abspath(path)
    cfg = ModelConfig.from_hf(os.path.join(path, "config.json"))
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(path, PARAMS))
    return cfg, {k: np.asarray(v) for k, v in tree.items()}
