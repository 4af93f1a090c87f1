"""Attention: NSA (the specification in `pallas_kernels.reference`, backends by name), dense
attention and the hybrid layer that routes between them."""

from nsa_jax.attention.config import AttentionConfig
from nsa_jax.attention.dense import dense_attention
from nsa_jax.attention.nsa import nsa_attention, resolve_implementation
from pallas_kernels.reference import (
    NSAConfig,
    combine_branches,
    compress_kv,
    compressed_attention,
    init_compress_params,
    nsa_reference,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)

__all__ = [
    "AttentionConfig",
    "NSAConfig",
    "combine_branches",
    "compress_kv",
    "compressed_attention",
    "dense_attention",
    "init_compress_params",
    "nsa_attention",
    "nsa_reference",
    "resolve_implementation",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
]
