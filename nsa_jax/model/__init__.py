"""Qwen2.5-VL / VideoNSA in Flax NNX: rope, vision tower, language model, whole model."""

from nsa_jax.model.vlm import Qwen25VL, init_model

__all__ = ["Qwen25VL", "init_model"]
