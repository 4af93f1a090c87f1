"""Vision tower numerics beyond the HF parity tests: many patches, gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.model.vision import SegmentLayout, VisionInputs, VisionTower, segment_attention

from hf_fixtures import TINY


def dense_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array) -> jax.Array:
    """The same attention in one piece: softmax over the keys of the query's segment."""
    s = jnp.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    s = jnp.where(seg[:, None] == seg[None, :], s, -jnp.inf)
    return jnp.einsum("hqk,khd->qhd", jax.nn.softmax(s, axis=-1), v)


def test_segment_attention_of_uneven_segments_has_exact_gradients(rng):
    # 1500 patches in runs of 1 to 95 patches: rows of the gathered batch padded unevenly
    n = 1500
    seg_np = np.repeat(np.arange(n), rng.integers(1, 96, n))[:n]
    q, k, v = (jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(seg_np)
    layout = jax.tree.map(jnp.asarray, SegmentLayout.from_segments(seg_np))
    cot = jnp.asarray(rng.standard_normal((n, 2, 8)), jnp.float32)

    def loss(fn, arg):
        return lambda q, k, v: jnp.sum(fn(q, k, v, arg) * cot)

    got = jax.grad(loss(segment_attention, layout), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(dense_segment_attention, seg), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(
        segment_attention(q, k, v, layout), dense_segment_attention(q, k, v, seg),
        rtol=1e-5, atol=1e-5,
    )
    # O(N x longest segment): no [N, N] array anywhere in the forward or backward
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(segment_attention, layout)))(q, k, v))
    assert f"{n},{n}" not in jaxpr and f"{n}, {n}" not in jaxpr
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
