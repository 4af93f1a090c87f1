"""Our checkpoint format: an orbax checkpoint of the flat parameter dict plus the config.

Layout of `CKPT/`:
  `config.json`  the model config in Hugging Face form (`ModelConfig.to_hf`, NSA under "nsa");
  `params/`      orbax (`StandardCheckpointer`) of `{our_path: array}`;
  `hf_extra/`    tokenizer / processor files carried over from the source HF directory.
"""

from __future__ import annotations

import json
import os

import numpy as np
import orbax.checkpoint as ocp

from nsa_jax.config import ModelConfig
from nsa_jax.convert.hf import copy_extra_files

PARAMS = "params"
EXTRA = "hf_extra"


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS))


def save_checkpoint(
    path: str, cfg: ModelConfig, params: dict[str, np.ndarray], *, extra_from: str | None = None
) -> None:
    """Writes `params` (flat dict, stored dtypes kept) and `cfg` to the new directory `path`."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS), {k: np.asarray(v) for k, v in params.items()})
    if extra_from is not None:
        copy_extra_files(extra_from, os.path.join(path, EXTRA))


def load_checkpoint(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Reads `(cfg, {our_path: array})` from a directory written by `save_checkpoint`."""
    path = os.path.abspath(path)
    cfg = ModelConfig.from_hf(os.path.join(path, "config.json"))
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(path, PARAMS))
    return cfg, {k: np.asarray(v) for k, v in tree.items()}
