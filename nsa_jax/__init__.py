"""nsa-jax: VideoNSA (Qwen2.5-VL with Native Sparse Attention for video) in JAX/Flax."""

from nsa_jax.attention import NSAConfig, dense_attention, nsa_attention
from nsa_jax.convert.load import load_model

__version__ = "0.1.0"
__all__ = ["NSAConfig", "__version__", "dense_attention", "load_model", "nsa_attention"]
