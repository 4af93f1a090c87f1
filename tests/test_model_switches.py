"""Model switches: NSA off / on per layer, VideoNSA's gate initialisation, query routing, remat."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax.config import preset
from nsa_jax.convert import names
from nsa_jax.convert.load import params_of
from nsa_jax.model.inputs import prepare
from nsa_jax.model.stacking import unstack_layers
from nsa_jax.model.vlm import Qwen25VL, init_model

from hf_fixtures import TINY, random_prompt

NSA = dataclasses.replace(preset("videonsa-7b-clean").nsa, block_size=4, num_selected=2, window=6)


def gate_layers(cfg) -> set[int]:
    return {int(p.split(".")[2]) for p in names.our_param_shapes(cfg) if "g_proj" in p}


def test_nsa_switch_adds_gates_only_to_the_chosen_layers():
    assert gate_layers(TINY) == set()
    assert gate_layers(TINY.with_attention(nsa=NSA)) == {0, 1}
    assert gate_layers(TINY.with_attention(nsa=NSA, layers=(1,))) == {1}
    with pytest.raises(ValueError, match="attention.layers"):
        TINY.with_attention(nsa=NSA, layers=(2,))


def test_gates_start_as_videonsa_initialises_them():
    t = TINY.text
    params = params_of(init_model(TINY.with_attention(nsa=NSA), seed=3))
    for layer in range(t.num_hidden_layers):
        pre = f"language.layers.{layer}.self_attn."
        w1, w2 = params[pre + "g_proj_1.kernel"], params[pre + "g_proj_2.kernel"]
        assert w2.shape == (t.hidden_size, 3 * t.num_attention_heads)
        assert not params[pre + "g_proj_1.bias"].any() and not params[pre + "g_proj_2.bias"].any()
        for w in (w1, w2):  # N(0, 0.02)
            assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002


@pytest.mark.parametrize("compat", [False, True])
def test_nsa_queries_come_from_token_ids_or_in_compat_from_positions(compat):
    model = init_model(TINY.with_attention(nsa=dataclasses.replace(NSA, videonsa_compat=compat)))
    # positions: two text tokens, then a 1 x 2 x 2 video whose first patch has t == h == w
    pos = jnp.asarray([[0, 1, 2, 2, 2, 2], [0, 1, 2, 2, 3, 3], [0, 1, 2, 3, 2, 3]])[None]
    video = jnp.asarray([[False, False, True, True, True, True]])
    li = model.language.layer_inputs(pos, jnp.ones((1, 6), jnp.int32), video)
    want = [False, False, not compat, True, True, True]
    assert np.asarray(li.is_video)[0].tolist() == want


def test_with_nsa_a_right_padded_prompt_equals_the_prompt_alone(rng):
    # NSA places its blocks by absolute position, so only right padding (or packing) leaves a
    # prompt's positions as they are alone; docs/model.md says so for left padding. (Not under
    # videonsa_compat: the released code's NSA sees padding, see docs/model.md.)
    model = init_model(TINY.with_attention(nsa=NSA, layers=(1,)), seed=4)  # one: compiles faster
    a = random_prompt(rng, videos=((2, 4, 4),), text_len=3)
    b = random_prompt(rng, videos=((2, 4, 6),), text_len=4)
    n, t = a["input_ids"].shape[1], b["input_ids"].shape[1]
    ids = np.zeros((2, t), np.int64)
    ids[0, :n], ids[1] = a["input_ids"][0], b["input_ids"][0]
    mask = (np.arange(t) < [[n], [t]]).astype(np.int64)
    batch = model(
        ids,
        attention_mask=mask,
        pixel_values_videos=np.concatenate([a["pixel_values_videos"], b["pixel_values_videos"]]),
        video_grid_thw=np.concatenate([a["video_grid_thw"], b["video_grid_thw"]]),
    )
    assert n + 4 <= t  # a whole NSA block (4 tokens) of padding
    np.testing.assert_allclose(batch[0, :n], model(**a)[0], rtol=1e-5, atol=1e-5)


def loss_grads_and_remat_regions(cfg, prompt: dict) -> tuple[jax.Array, list, int]:
    """The loss `mean(logits^2)` of `prompt`, its gradients, and how many rematerialised
    regions the forward's jaxpr holds."""
    model = init_model(cfg, seed=1)
    prepared = prepare(model.cfg, **prompt)

    def loss(m: Qwen25VL) -> jax.Array:
        return jnp.mean(m.forward(**prepared) ** 2)

    value, grads = nnx.value_and_grad(loss)(model)
    graph, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graph, s).forward(**prepared))(state)
    return value, jax.tree.leaves(grads), str(jaxpr).count("remat")


def assert_same_loss_and_grads(results: list[tuple]) -> None:
    (v0, g0, _), *rest = results
    for v, g, _ in rest:
        np.testing.assert_allclose(v, v0, rtol=1e-6)
        chex.assert_trees_all_close(g, g0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", ["minimal_offloaded", "qkv_proj_offloaded"])
def test_host_offloading_policies_change_neither_loss_nor_gradients(rng, policy):
    # what they save goes to host memory (pinned_host) and comes back for the backward pass
    prompt = {"input_ids": rng.integers(0, 990, (1, 9))}
    results = [loss_grads_and_remat_regions(TINY.replace(remat=remat, remat_policy=policy),
                                            prompt) for remat in (False, True)]
    assert results[0][2] == 0 < results[1][2]
    assert_same_loss_and_grads(results)


def test_remat_changes_neither_logits_nor_gradients(rng):
    prompt = {"input_ids": rng.integers(0, 990, (1, 9))}
    results = [loss_grads_and_remat_regions(TINY.replace(remat=remat), prompt)
               for remat in (False, True)]
    assert results[0][2] == 0 < results[1][2]  # each decoder layer rematerialised
    assert_same_loss_and_grads(results)


def test_vision_tower_recomputed_whole_gives_the_same_gradients(rng):
    # vision_remat="tower" wraps the per-block remat of the vision tower in one more remat of
    # the whole tower: the same numbers, one more rematerialised region
    prompt = random_prompt(rng, videos=((4, 4, 4),))
    results = [loss_grads_and_remat_regions(TINY.replace(remat=remat, vision_remat=vr), prompt)
               for remat, vr in ((False, "block"), (True, "block"), (True, "tower"))]
    regions = [r[2] for r in results]
    assert regions[0] == 0 and regions[2] == regions[1] + 1
    assert_same_loss_and_grads(results)


def test_vision_remat_must_be_block_or_tower():
    with pytest.raises(ValueError, match="vision_remat must be 'block' or 'tower'"):
        TINY.replace(vision_remat="layers")


@pytest.mark.parametrize("overrides", [
    ["model.remat=true"],
    # the whole tower recomputed, also the scanned case's: `-m slow` runs it alone
    pytest.param(["model.remat=true", "model.vision_remat=tower"], marks=pytest.mark.slow),
    ["model.remat=true", "model.vision_remat=tower", "model.scan_layers=true"],
], ids=["block", "tower", "tower-scanned"])
def test_remat_in_the_train_step_gives_the_loss_and_gradients_without_it(overrides):
    # the train step runs the vision tower under jax.vmap (one layout per row, VideoRows):
    # rematerialised blocks must not write the caller's variables from inside the vmap
    from nsa_jax.train import sharding
    from nsa_jax.train.batch import model_batch, synthetic_batch
    from nsa_jax.train.config import load_config
    from nsa_jax.train.step import Trainer

    results = []
    for cfg in (load_config("tiny", []), load_config("tiny", overrides)):
        trainer = Trainer.build(cfg, sharding.make_mesh("data=1"))
        raw = synthetic_batch(cfg.model, 1, 128, answer_tokens=4, frame_patches=(4, 4), seed=0)
        batch = trainer.put_batch(model_batch(raw, cfg.model))
        results.append(trainer.accumulate(trainer.init_state(), trainer.zero_grads(), batch))
    (g0, l0), (g1, l1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    # scanned: the decoder layers' gradients come stacked
    chex.assert_trees_all_close(unstack_layers(g1), g0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_eval_loss_from_parameters_alone_is_the_training_steps_loss(dtype):
    # eval_loss needs no optimiser state: experiments/scaling.py's prefill holds bf16 weights
    from nsa_jax.train import sharding
    from nsa_jax.train.batch import model_batch, synthetic_batch
    from nsa_jax.train.config import load_config
    from nsa_jax.train.step import Trainer

    cfg = load_config("tiny", ["optim.vision.frozen=true", f"param_dtype={dtype}",
                               f"compute_dtype={dtype}"])
    trainer = Trainer.build(cfg, sharding.make_mesh("data=1"))
    state = trainer.init_state()
    raw = synthetic_batch(cfg.model, 2, 128, answer_tokens=4, frame_patches=(4, 4), seed=1)
    batch = trainer.put_batch(model_batch(raw, cfg.model))
    assert state.frozen and state.params
    loss = trainer.eval_loss(state.params, state.frozen, batch)
    assert float(loss) > 0
    _, train_loss = trainer.accumulate(state, trainer.zero_grads(), batch)
    np.testing.assert_allclose(loss, train_loss, rtol=1e-6)
