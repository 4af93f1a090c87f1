"""Dense causal attention on TPU (splash attention, interpret mode) against a pure-jnp
reference: outputs and the gradients of q, k, v, with GQA and packed segments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.tpu.dense import DenseBlockSizes, dense_attention
from tests import tpu_utils as tu


def _dense_reference(q, k, v, segment_ids=None):
    """Softmax over the causal keys of the query's segment, in f32; padding queries give 0."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    kk = jnp.repeat(k.astype(jnp.float32), g, axis=2)
    vv = jnp.repeat(v.astype(jnp.float32), g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk) * d**-0.5
    pos = jnp.arange(t)
    mask = (pos[None, :] <= pos[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
    mask = (mask & (seg[:, :, None] > 0))[:, None]
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", jnp.where(mask, p, 0.0), vv)
    return jnp.where(seg[:, :, None, None] > 0, o, 0.0).astype(q.dtype)


@pytest.mark.parametrize(
    "dtype, hq, hkv, d, t, with_segments",
    [
        (jnp.float32, 7, 1, 128, 200, True),  # GQA 7, T off the 128 grid, packed samples
        (jnp.bfloat16, 4, 2, 64, 256, False),  # GQA 2, two KV heads, head dim 64
    ],
)
def test_dense_matches_reference(rng, dtype, hq, hkv, d, t, with_segments):
    q, k, v = tu.qkv(rng, 2, t, hq, hkv, d, dtype)
    seg = tu.packed_segments(rng, 2, t) if with_segments else None
    bsz = DenseBlockSizes(block_q=128, block_kv=128)

    def fn(q, k, v):
        return dense_attention(q, k, v, seg, block_sizes=bsz)

    def want(q, k, v):
        return _dense_reference(q, k, v, seg)

    tu.check_fwd_and_grads(fn, want, (q, k, v), dtype, "qkv")


def test_block_sizes_checked():
    with pytest.raises(ValueError, match="block_q"):
        DenseBlockSizes(block_q=100)
