"""Stacked decoder layers (`scan_layers`, `model/stacking.py`): the names of both layouts, no
stacked copy in the compiled step, the same initial values, conversion and resume."""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax.config import TextConfig
from nsa_jax.convert.hf import read_hf, write_hf
from nsa_jax.convert.load import model_from_params, params_of
from nsa_jax.convert.names import named_variables
from nsa_jax.model.inputs import prepare
from nsa_jax.model.language import REMAT_POLICIES, LanguageModel
from nsa_jax.model.layers import scan_modules
from nsa_jax.model.stacking import in_layout, layer_runs, stack_layers, unstack_layers
from nsa_jax.model.vlm import init_model
from nsa_jax.train import sharding
from nsa_jax.train.batch import model_batch, synthetic_batch
from nsa_jax.train.checkpoint import Checkpoints, read_step_params, step_params
from nsa_jax.train.config import load_config
from nsa_jax.train.step import ModelDef, Trainer, init_params

from hf_fixtures import TINY, random_prompt


def flat(state: nnx.State) -> dict[str, np.ndarray]:
    return {n: np.asarray(v.get_value()) for n, v in named_variables(state)}


def three_layers(scan: bool):
    """TINY with hybrid layers 0, 1 and a dense layer 2: two runs."""
    from test_model_scan import NSA

    return TINY.replace(
        text=dataclasses.replace(TINY.text, num_hidden_layers=3), scan_layers=scan
    ).with_attention(nsa=NSA, layers=(0, 1))


def test_the_two_layouts_name_each_other():
    cfg = three_layers(True)
    assert layer_runs(cfg) == [range(0, 2), range(2, 3)]
    rng = np.random.default_rng(0)
    per_layer = {
        f"language.layers.{i}.mlp.up_proj.kernel": rng.normal(size=(2, 3)) for i in range(3)
    }
    per_layer["language.layers.1.self_attn.g_proj_1.bias"] = rng.normal(size=4)
    per_layer["language.layers.0.self_attn.g_proj_1.bias"] = rng.normal(size=4)
    per_layer["language.norm.weight"] = rng.normal(size=3)
    stacked = stack_layers(cfg, per_layer)
    assert {n: x.shape for n, x in stacked.items()} == {
        "language.layers.0:2.mlp.up_proj.kernel": (2, 2, 3),
        "language.layers.2:3.mlp.up_proj.kernel": (1, 2, 3),
        "language.layers.0:2.self_attn.g_proj_1.bias": (2, 4),
        "language.norm.weight": (3,),
    }
    np.testing.assert_array_equal(
        stacked["language.layers.0:2.mlp.up_proj.kernel"][1],
        per_layer["language.layers.1.mlp.up_proj.kernel"],
    )
    back = unstack_layers(stacked)
    assert set(back) == set(per_layer)
    for name, x in per_layer.items():
        np.testing.assert_array_equal(back[name], x)
    assert in_layout(cfg, stacked) == stacked
    assert set(in_layout(cfg.replace(scan_layers=False), stacked)) == set(per_layer)
    assert sharding.param_logical_axes("language.layers.0:2.mlp.up_proj.kernel", 3) == (
        "layers",
        "embed",
        "mlp",
    )


def test_a_fresh_runs_parameters_are_the_same_in_both_layouts():
    cfg = load_config("tiny").model
    per_layer = init_params(ModelDef.of(cfg, jnp.float32, jnp.float32), seed=0)
    stacked_md = ModelDef.of(cfg.replace(scan_layers=True), jnp.float32, jnp.float32)
    stacked = init_params(stacked_md, seed=0)
    assert "language.layers.0:2.self_attn.q_proj.kernel" in stacked
    got = unstack_layers({n: np.asarray(x) for n, x in stacked.items()})
    assert set(got) == set(per_layer)
    for name, x in per_layer.items():
        np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_the_step_holds_no_stacked_copy_of_the_layers():
    """Compiled loss-and-gradients of 8 scanned decoder layers: stored stacked, the temporary
    buffers are smaller by about the layers' parameters than with the layers stored one by one
    and stacked per call (the layout before), which copies the parameters into a stack and
    takes their gradients out of one."""
    text = TextConfig(
        vocab_size=64,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(8, 12, 12),
        rope_theta=10000.0,
    )
    cfg = TINY.replace(text=text, remat=True, scan_layers=True).with_attention(nsa=None)
    b, t = 1, 64
    pos = jnp.broadcast_to(jnp.arange(t)[None, None], (b, 3, t))
    x = jax.random.normal(jax.random.key(0), (b, t, text.hidden_size))

    def temp_bytes(scan_per_call: bool) -> tuple[int, int]:
        lm = LanguageModel(
            cfg.replace(scan_layers=not scan_per_call), dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
        graph, state = nnx.split(lm)
        layers = nnx.state(lm.layers)

        def loss(state: nnx.State) -> jax.Array:
            m = nnx.merge(graph, state)
            li = m.layer_inputs(pos, None, jnp.zeros((b, t), bool))
            if scan_per_call:  # the former `scan_layers`: one module per layer, stacked here
                h = scan_modules(
                    list(m.layers), x, lambda layer, h: layer(h, li), REMAT_POLICIES["full"]
                )
            else:
                h = m(x, li)
            return jnp.mean(h * h)

        compiled = jax.jit(jax.grad(loss)).lower(state).compile()
        size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(layers))
        return compiled.memory_analysis().temp_size_in_bytes, size

    (before, size), (after, size2) = temp_bytes(True), temp_bytes(False)
    assert size == size2 and size > 25 * 2**20
    print(
        f"temp bytes: {before / 2**20:.1f} MiB stacked per call, {after / 2**20:.1f} MiB "
        f"stored stacked; layers' parameters {size / 2**20:.1f} MiB"
    )
    assert before - after >= size


def test_a_stacked_model_converts_to_hf_per_layer_and_back(tmp_path, rng):
    cfg = three_layers(True)
    model = init_model(cfg, seed=1)
    params = params_of(model)
    assert "language.layers.2.mlp.up_proj.kernel" in params
    assert not any(":" in n for n in params)
    write_hf(str(tmp_path / "hf"), cfg, params)
    got_cfg, got = read_hf(str(tmp_path / "hf"), cfg)
    assert set(got) == set(params)
    back = model_from_params(got_cfg.replace(scan_layers=True), got)
    want = flat(nnx.state(model))
    for name, x in flat(nnx.state(back)).items():
        np.testing.assert_array_equal(x, want[name], err_msg=name)
    prompt = prepare(model.cfg, **random_prompt(rng, cfg, videos=((2, 8, 8),)))
    np.testing.assert_array_equal(back.forward(**prompt), model.forward(**prompt))


def step(trainer: Trainer, state, seed: int):
    cfg = trainer.cfg
    raw = synthetic_batch(cfg.model, 2, 128, answer_tokens=4, frame_patches=(4, 4), seed=seed)
    batch = trainer.put_batch(model_batch(raw, cfg.model))
    acc, loss = trainer.accumulate(state, trainer.zero_grads(), batch)
    return trainer.apply(state, acc, jnp.float32(4 * 2), loss)[0]


@pytest.mark.parametrize("saved_scan", [False, True], ids=["per-layer", "stacked"])
def test_resume_converts_a_checkpoint_of_the_other_layout(tmp_path, saved_scan):
    """A train checkpoint with per-layer names (as every run wrote before layers were stored
    stacked) resumes a scanned run, and a stacked one an unscanned run: the same parameters
    and moments, and the next step the same as the writer's."""
    scanned = load_config("tiny", ["model.scan_layers=true"])
    mesh = sharding.make_mesh("data=1")
    writer = Trainer.build(load_config("tiny", [f"model.scan_layers={saved_scan}"]), mesh)
    reader = Trainer.build(load_config("tiny", [f"model.scan_layers={not saved_scan}"]), mesh)
    state = step(writer, writer.init_state(), seed=0)
    ckpt = Checkpoints(tmp_path, scanned)  # the config an old scanned run saved
    ckpt.save(state, iter(grain.MapDataset.range(3).to_iter_dataset()), global_batch=2)
    ckpt.wait()
    data = iter(grain.MapDataset.range(3).to_iter_dataset())
    restored = ckpt.restore(1, reader.abstract_state(), data, global_batch=2)
    assert any(":" in n for n in restored.params) == (not saved_scan)

    def per_layer(s) -> dict[str, np.ndarray]:
        mu = s.opt_state[1].mu  # clip, then Adam
        return {
            **{"p." + n: np.asarray(x) for n, x in unstack_layers(s.params).items()},
            **{"mu." + n: np.asarray(x) for n, x in unstack_layers(mu).items()},
        }

    want, got = per_layer(state), per_layer(restored)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # a step's parameters read alone (export, generate --ckpt RUN) come per layer
    lazy, eager = (
        step_params(tmp_path / "checkpoints" / "1"),
        read_step_params(tmp_path / "checkpoints" / "1"),
    )
    assert set(lazy) == set(eager) == {n[2:] for n in want if n.startswith("p.")}
    for name, x in eager.items():
        np.testing.assert_array_equal(x, want["p." + name], err_msg=name)
        np.testing.assert_array_equal(lazy[name].load(), x, err_msg=name)
    want, got = per_layer(step(writer, state, 1)), per_layer(step(reader, restored, 1))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
