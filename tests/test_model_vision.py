"""Vision tower numerics beyond the HF parity tests: many patches, gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.model import vision
from nsa_jax.model.vision import VisionInputs, VisionTower, segment_attention

from hf_fixtures import TINY


def dense_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
    """The same attention in one piece: softmax over the keys of the query's segment."""
    s = jnp.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(seg[:, None] == seg[None, :], s, -jnp.inf)
    return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, axis=-1), v)


def test_segment_attention_over_more_patches_than_one_query_chunk_has_exact_gradients(rng):
    # 1500 patches: a full chunk of 1024 queries, then a chunk padded with 548 rows of no segment
    n = 1500
    assert n > vision.QUERY_CHUNK and n % vision.QUERY_CHUNK
    q, k, v = (jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.arange(n) // 96)  # windows straddle the chunk boundary
    cot = jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg) * cot)

    got = jax.grad(loss(segment_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense_segment_attention), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(
        segment_attention(q, k, v, seg), dense_segment_attention(q, k, v, seg), rtol=1e-5, atol=1e-5
    )
    for name, g, w in zip("qkv", got, want, strict=True):
        assert np.isfinite(g).all(), f"d{name} not finite"
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_vision_tower_gradients_are_finite_for_a_video_of_more_than_1024_patches(rng):
    cfg = dataclasses.replace(TINY.vision, hidden_size=16, intermediate_size=32, out_hidden_size=16)
    grid = np.asarray([[2, 28, 28]])  # 1568 patches
    tower = VisionTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    inputs = jax.tree.map(jnp.asarray, VisionInputs.from_grid(grid, cfg))
    pixels = jnp.asarray(rng.standard_normal((int(grid.prod()), cfg.patch_dim)), jnp.float32)

    def loss(t: VisionTower) -> jax.Array:
        return jnp.mean(t(pixels, inputs) ** 2)

    grads = nnx.jit(nnx.grad(loss))(tower)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
