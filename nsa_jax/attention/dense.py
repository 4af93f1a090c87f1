"""Dense causal attention with segments and GQA: the text rows and the dense layers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.reference import checks

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("implementation",))
def dense_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    *,
    implementation: str | None = None,
) -> Array:
    """Dense causal attention for text tokens: `[B, T, Hq, D]` over `[B, T, Hkv, D]`.

    Uses `jax.nn.dot_product_attention` with "cudnn" on a GPU and "xla" elsewhere, chosen by
    backend (cuDNN raises on a CPU-only machine). With `segment_ids`, queries attend only
    within their segment and padding queries (segment 0) return zeros.
    """
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    checks.check_segment_ids(segment_ids, b, t)
    if implementation is None:
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    seg = segment_ids.astype(jnp.int32)
    if implementation == "cudnn":
        # cuDNN takes no arbitrary mask: packed segments run through XLA.
        implementation = "xla"
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] > 0)
    o = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=implementation
    )
    return jnp.where(seg[:, :, None, None] > 0, o, 0).astype(q.dtype)
