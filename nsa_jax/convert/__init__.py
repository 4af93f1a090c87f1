"""Checkpoint conversion: Hugging Face safetensors <-> our orbax checkpoints, and `load_model`."""

from nsa_jax.convert.checkpoint import inspect_checkpoint, load_checkpoint, save_checkpoint
from nsa_jax.convert.hf import CheckpointError, HFCheckpoint, inspect_hf, read_hf, write_hf
from nsa_jax.convert.load import load_model, model_from_params, params_of
from nsa_jax.convert.source import HFSource

__all__ = [
    "CheckpointError",
    "HFCheckpoint",
    "HFSource",
    "inspect_checkpoint",
    "inspect_hf",
    "load_checkpoint",
    "load_model",
    "model_from_params",
    "params_of",
    "read_hf",
    "save_checkpoint",
    "write_hf",
]
