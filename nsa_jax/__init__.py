"""nsa-jax: VideoNSA (Qwen2.5-VL with Native Sparse Attention for video) in JAX/Flax."""

from typing import Any

from nsa_jax.attention import NSAConfig, dense_attention, nsa_attention

__version__ = "0.1.0"
__all__ = ["NSAConfig", "__version__", "dense_attention", "load_model", "nsa_attention"]


def __getattr__(name: str) -> Any:
    # `load_model` pulls in the model, flax and orbax: import it on first use so that the
    # attention functions (and the kernels behind them) load without them
    if name == "load_model":
        from nsa_jax.convert.load import load_model

        return load_model
    raise AttributeError(f"module 'nsa_jax' has no attribute {name!r}")
