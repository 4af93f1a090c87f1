"""Vision tower numerics beyond the HF parity tests: many patches, gradients."""

from __future__ import annotations

import dataclasses

import chex
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
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_vision_tower_gradients_match_differences_for_a_video_of_more_than_1024_patches(rng):
    """The parameters' gradient along a random unit direction against central differences of
    a loss linear in the output (float32: the step and tolerance fit its rounding)."""
    cfg = dataclasses.replace(TINY.vision, hidden_size=16, intermediate_size=32, out_hidden_size=16)
    grid = np.asarray([[2, 28, 28]])  # 1568 patches
    graph, params = nnx.split(VisionTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    inputs = jax.tree.map(jnp.asarray, VisionInputs.from_grid(grid, cfg))
    pixels = jnp.asarray(rng.standard_normal((int(grid.prod()), cfg.patch_dim)), jnp.float32)
    merged = int(grid.prod()) // cfg.spatial_merge_size**2
    cot = jnp.asarray(rng.standard_normal((merged, cfg.out_hidden_size)), jnp.float32)

    @jax.jit
    def loss(p: nnx.State) -> jax.Array:
        return jnp.sum(nnx.merge(graph, p)(pixels, inputs) * cot)

    grads = jax.jit(jax.grad(loss))(params)
    u = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(u)))
    u = jax.tree.map(lambda x: x / norm, u)
    eps = 1e-2
    fd = (loss(jax.tree.map(lambda p, d: p + eps * d, params, u))
          - loss(jax.tree.map(lambda p, d: p - eps * d, params, u))) / (2 * eps)
    got = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(u),
                                              strict=True))
    np.testing.assert_allclose(got, fd, rtol=1e-3, atol=1e-4)
