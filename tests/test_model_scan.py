"""Scanned layers (`ModelConfig.scan_layers`): the same function as the unrolled model, and a
program whose size does not grow with depth."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax.config import ModelConfig, preset
from nsa_jax.convert.names import named_variables
from nsa_jax.model.inputs import prepare
from nsa_jax.model.layers import same_runs
from nsa_jax.model.stacking import stack_layers, unstack_layers
from nsa_jax.model.vlm import init_model

from hf_fixtures import TINY, random_prompt

NSA = dataclasses.replace(preset("videonsa-7b-clean").nsa, block_size=16, num_selected=2,
                          window=16)


def deeper(cfg: ModelConfig, layers: int, blocks: int, full: int) -> ModelConfig:
    """`cfg` with `layers` decoder layers and `blocks` vision blocks, block `full` the one
    with full (per-frame) attention."""
    return cfg.replace(
        text=dataclasses.replace(cfg.text, num_hidden_layers=layers),
        vision=dataclasses.replace(cfg.vision, depth=blocks, fullatt_block_indexes=(full,)),
    )


def test_same_runs_groups_consecutive_equal_keys():
    assert same_runs([1, 1, 2, 1]) == [range(0, 2), range(2, 3), range(3, 4)]
    assert same_runs([True] * 3) == [range(0, 3)]
    assert same_runs([]) == []


def flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {n: np.asarray(v.get_value()) for n, v in named_variables(state)}


@pytest.mark.parametrize("remat", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_scanned_model_equals_the_unrolled_one_with_its_gradients(rng, remat):
    # hybrid layers 0 and 1, a dense layer 2: two scanned runs, stored as two stacks; vision
    # blocks window, window, full: two runs
    cfg = deeper(TINY, 3, 3, full=2).with_attention(nsa=NSA, layers=(0, 1)).replace(
        remat=remat, remat_policy="minimal")
    models = [init_model(cfg.replace(scan_layers=scan), seed=3) for scan in (False, True)]
    prepared = prepare(models[0].cfg, **random_prompt(rng, cfg, videos=((2, 8, 8),)))
    text_rows = prepared.pop("text_rows")
    unrolled, scanned = (flat(nnx.state(m)) for m in models)
    assert {n for n in scanned if n.startswith("language.layers.")} == {
        n for n in stack_layers(models[1].cfg, unrolled) if n.startswith("language.layers.")}
    assert scanned["language.layers.0:2.mlp.up_proj.kernel"].shape == (
        2, *unrolled["language.layers.0.mlp.up_proj.kernel"].shape)
    for name, x in unstack_layers(scanned).items():  # the same initial values
        np.testing.assert_array_equal(x, unrolled[name], err_msg=name)

    def loss(state: nnx.State, graph: nnx.GraphDef) -> jax.Array:
        logits = nnx.merge(graph, state).forward(**prepared, text_rows=text_rows)
        return jnp.mean(jnp.tanh(logits)), logits

    # jitted: two compiles, where op by op every layer's ops compile one by one
    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, want), gw = grad(*reversed(nnx.split(models[0])))
    (_, got), gg = grad(*reversed(nnx.split(models[1])))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # scanned: the decoder layers' gradients come stacked
    chex.assert_trees_all_close(unstack_layers(flat(gg)), flat(gw), rtol=1e-4, atol=1e-6)


def test_scanned_program_does_not_grow_with_depth(rng):
    """The lowered loss-and-grad program from 2 to 8 layers (and vision blocks): scanned, the
    layers' matmuls are traced once; unrolled, once per layer."""

    def matmuls(layers: int, scan: bool) -> int:
        cfg = deeper(TINY.with_attention(nsa=NSA).replace(remat=True, scan_layers=scan), layers,
                     layers, full=layers - 1)
        model = init_model(cfg)
        prepared = prepare(model.cfg, **random_prompt(np.random.default_rng(0), cfg,
                                                 videos=((2, 8, 8),)))
        text_rows = prepared.pop("text_rows")
        graph, state = nnx.split(model)

        def loss(state: nnx.State) -> jax.Array:
            return jnp.mean(nnx.merge(graph, state).forward(**prepared, text_rows=text_rows))

        return jax.jit(jax.grad(loss)).lower(state).as_text().count("dot_general")

    assert matmuls(8, True) == matmuls(2, True)
    assert matmuls(8, False) > 3 * matmuls(2, False)
