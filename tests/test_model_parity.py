"""Parity of the JAX model with transformers' Qwen2.5-VL on a random tiny checkpoint (CPU).

torch and transformers are dev dependencies, imported directly: without them these tests fail
rather than skip.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nsa_jax.config import ModelConfig, preset
from nsa_jax.convert import load_model
from nsa_jax.convert.hf import read_hf
from nsa_jax.convert.load import model_from_params, params_of
from nsa_jax.model import rope
from nsa_jax.model.inputs import prepare
from nsa_jax.model.vision import VisionInputs
from nsa_jax.model.vlm import Qwen25VL, init_model

from hf_fixtures import TINY, hf_logits, make_tiny_hf_checkpoint, random_prompt

TOL = 1e-4  # issue 4's "max relative error", relative to the largest reference logit


def max_abs_err_over_max_ref(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|: the error relative to the scale of the logits (an
    elementwise ratio would blow up at the logits that happen to be near zero)."""
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny_hf")
    hf = make_tiny_hf_checkpoint(str(path))
    return path, hf, load_model(path)


IMAGE = ((1, 6, 8),)
VIDEOS = ((2, 4, 4), (3, 6, 4))


def test_text_only_logits_match(tiny, rng):
    _, hf, model = tiny
    ids = rng.integers(0, 990, (2, 11))
    ref = hf_logits(hf, {"input_ids": ids})
    assert max_abs_err_over_max_ref(model(ids), ref) <= TOL


def test_text_with_left_padding_matches_on_real_tokens(tiny, rng):
    _, hf, model = tiny
    ids = rng.integers(0, 990, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ref = hf_logits(hf, {"input_ids": ids, "attention_mask": mask})
    out = np.asarray(model(ids, attention_mask=mask))
    keep = mask.astype(bool)
    assert max_abs_err_over_max_ref(out[keep], ref[keep]) <= TOL


def test_image_prompt_logits_match(tiny, rng):
    _, hf, model = tiny
    inputs = random_prompt(rng, images=IMAGE)
    ref = hf_logits(hf, inputs)
    assert max_abs_err_over_max_ref(model(**inputs), ref) <= TOL


def test_two_videos_with_different_grids_match(tiny, rng):
    _, hf, model = tiny
    inputs = random_prompt(rng, videos=VIDEOS)
    inputs["second_per_grid_ts"] = np.asarray([1.0, 0.75], np.float32)
    ref = hf_logits(hf, inputs)
    assert max_abs_err_over_max_ref(model(**inputs), ref) <= TOL


def test_image_and_video_in_one_prompt_match(tiny, rng):
    _, hf, model = tiny
    inputs = random_prompt(rng, images=((1, 4, 4),), videos=((2, 4, 6),))
    ref = hf_logits(hf, inputs)
    assert max_abs_err_over_max_ref(model(**inputs), ref) <= TOL


def test_batch_of_two_left_padded_prompts_matches_on_real_tokens(tiny, rng):
    # visual inputs of a batch are concatenated in sample order, as the processor does
    _, hf, model = tiny
    a = random_prompt(rng, videos=((2, 4, 4),))
    b = random_prompt(rng, images=((1, 4, 6),), videos=((2, 2, 4),))
    lengths = [a["input_ids"].shape[1], b["input_ids"].shape[1]]
    t = max(lengths)
    ids, mask = np.zeros((2, t), np.int64), np.zeros((2, t), np.int64)
    for row, (p, n) in enumerate(zip((a, b), lengths, strict=True)):
        ids[row, t - n :], mask[row, t - n :] = p["input_ids"][0], 1
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=b["pixel_values"],
        image_grid_thw=b["image_grid_thw"],
        pixel_values_videos=np.concatenate([a["pixel_values_videos"], b["pixel_values_videos"]]),
        video_grid_thw=np.concatenate([a["video_grid_thw"], b["video_grid_thw"]]),
    )
    ref = hf_logits(hf, inputs)
    keep = mask.astype(bool)
    assert max_abs_err_over_max_ref(np.asarray(model(**inputs))[keep], ref[keep]) <= TOL


def processor_output(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What transformers 5's `Qwen2_5_VLProcessor` returns for `inputs`: every key of its
    `model_input_names`, `mm_token_type_ids` made by the processor's own method (its image and
    video processors need torchvision, which the environment leaves out)."""
    from types import SimpleNamespace

    from transformers.processing_utils import ProcessorMixin

    ids = inputs["input_ids"]
    tokens = SimpleNamespace(
        image_token_ids=[TINY.image_token_id],
        video_token_ids=[TINY.video_token_id],
        audio_token_ids=[],
    )
    out = dict(inputs, attention_mask=np.ones_like(ids))
    out["mm_token_type_ids"] = np.asarray(ProcessorMixin.create_mm_token_type_ids(tokens, ids))
    out["second_per_grid_ts"] = np.full(len(inputs["video_grid_thw"]), 1.0, np.float32)
    return out


def test_a_processor_output_feeds_both_models(tiny, rng):
    _, hf, model = tiny
    out = processor_output(random_prompt(rng, images=((1, 4, 4),), videos=((2, 4, 6),)))
    assert set(out) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    }
    with torch.no_grad():
        ref = hf(**{k: torch.as_tensor(v) for k, v in out.items()}).logits.numpy()
    assert max_abs_err_over_max_ref(model(**out), ref) <= TOL


def test_mm_token_type_ids_that_contradict_the_token_ids_are_refused(tiny, rng):
    _, _, model = tiny
    out = processor_output(random_prompt(rng, videos=((2, 4, 4),)))
    out["mm_token_type_ids"][0, 0] = 2  # a text token called video
    with pytest.raises(ValueError, match=r"mm_token_type_ids disagrees with input_ids at \[0, 0\]"):
        model(**out)
    out["attention_mask"][0, 0] = 0  # on padding the types are not read, as in transformers
    told_true = dict(out, mm_token_type_ids=np.where(np.arange(out["input_ids"].shape[1]) == 0,
                                                      0, out["mm_token_type_ids"]))
    np.testing.assert_array_equal(np.asarray(model(**out)), np.asarray(model(**told_true)))


def test_the_call_signature_is_the_documented_one(tiny):
    import inspect

    params = inspect.signature(tiny[2].__call__).parameters
    assert list(params) == [
        "input_ids",
        "attention_mask",
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        "mm_token_type_ids",
        "segment_ids",  # ours from here on: packed samples, the pipeline's positions
        "position_ids",
        "return_hidden",
    ]
    assert params["input_ids"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(
        p.kind is inspect.Parameter.KEYWORD_ONLY
        and p.default is (False if name == "return_hidden" else None)
        for name, p in params.items()
        if name != "input_ids"
    )


def test_vision_tower_alone_matches(tiny, rng):
    _, hf, model = tiny
    grid = np.asarray([(1, 6, 8), (2, 4, 4)])
    pixels = rng.standard_normal((int(grid.prod(-1).sum()), TINY.vision.patch_dim)).astype(
        np.float32
    )
    with torch.no_grad():
        ref = hf.model.visual(torch.as_tensor(pixels), grid_thw=torch.as_tensor(grid)).pooler_output
    vi = jax.tree.map(jnp.asarray, VisionInputs.from_grid(grid, TINY.vision))
    out = model.visual(jnp.asarray(pixels), vi)
    assert out.shape == tuple(ref.shape)
    assert max_abs_err_over_max_ref(out, ref.numpy()) <= TOL


@pytest.mark.parametrize(
    "images,videos,seconds,masked",
    [
        (IMAGE, (), None, False),
        ((), VIDEOS, [1.0, 0.75], False),
        ((), VIDEOS, None, False),
        (((1, 4, 4),), ((4, 2, 2),), [2.5], True),
    ],
)
def test_rope_index_equals_transformers(tiny, rng, images, videos, seconds, masked):
    _, hf, _ = tiny
    inputs = random_prompt(rng, images=images, videos=videos)
    ids = inputs["input_ids"]
    mask = None
    if masked:  # left padding
        ids = np.concatenate([np.zeros((1, 3), ids.dtype), ids], 1)
        mask = np.concatenate([np.zeros((1, 3)), np.ones((1, ids.shape[1] - 3))], 1).astype(
            np.int64
        )
    types = rope.token_types(ids, TINY.image_token_id, TINY.video_token_id)
    kw = dict(
        image_grid_thw=torch.as_tensor(inputs["image_grid_thw"]) if images else None,
        video_grid_thw=torch.as_tensor(inputs["video_grid_thw"]) if videos else None,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None,
        attention_mask=None if mask is None else torch.as_tensor(mask),
    )
    ref_pos, ref_delta = hf.model.get_rope_index(
        torch.as_tensor(ids), mm_token_type_ids=torch.as_tensor(types), **kw
    )
    pos, delta = rope.get_rope_index(
        ids,
        image_token_id=TINY.image_token_id,
        video_token_id=TINY.video_token_id,
        spatial_merge_size=2,
        tokens_per_second=TINY.vision.tokens_per_second,
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=None if seconds is None else np.asarray(seconds, np.float32),
        attention_mask=mask,
    )
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_qwen_style_rope_index_counts_the_temporal_axis():
    # a 3-frame video (merged grid 1x1) at interval 4: temporal positions s, s+4, s+8, so the
    # original Qwen code resumes text at s+9 while transformers 5 resumes at s+1
    ids = np.asarray([[1, 998, 998, 998, 2]])
    kw = dict(
        image_token_id=997,
        video_token_id=998,
        spatial_merge_size=2,
        tokens_per_second=4,
        video_grid_thw=np.asarray([[3, 2, 2]]),
    )
    hf_style, _ = rope.get_rope_index(ids, **kw)
    qwen_style, _ = rope.get_rope_index(ids, **kw, style="qwen")
    assert hf_style[:, 0, -1].tolist() == [2, 2, 2]
    assert qwen_style[:, 0, -1].tolist() == [10, 10, 10]
    assert qwen_style[0, 0, 1:4].tolist() == [1, 5, 9]


def test_jit_forward_and_bf16(tiny, rng):
    path, hf, _ = tiny
    model = load_model(path, dtype=jnp.bfloat16)
    inputs = random_prompt(rng, videos=((2, 4, 4),))
    ref = hf_logits(hf, inputs)
    out = np.asarray(model(**inputs))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert max_abs_err_over_max_ref(out, ref) < 0.1  # bf16 weights and activations


def test_nsa_on_text_before_first_video_matches_and_gradients_match_differences(tiny, rng):
    path, hf, _ = tiny
    base = ModelConfig.from_hf(path)
    nsa = dataclasses.replace(
        preset("videonsa-7b-clean").nsa, block_size=4, num_selected=2, window=6
    )
    cfg = base.with_attention(nsa=nsa, layers=(1,))
    _, params = read_hf(str(path), base)
    gates = {k: v for k, v in params_of(init_model(cfg)).items() if "g_proj" in k}
    model = model_from_params(cfg, {**params, **gates})
    inputs = random_prompt(rng, videos=VIDEOS, text_len=7)
    ref = hf_logits(hf, inputs)
    out = np.asarray(model(**inputs))
    first = int(np.argmax(inputs["input_ids"][0] == TINY.video_token_id))
    assert max_abs_err_over_max_ref(out[:, :first], ref[:, :first]) <= TOL
    assert (
        max_abs_err_over_max_ref(out[:, first:], ref[:, first:]) > TOL
    )  # NSA changes the video positions

    prepared = prepare(model.cfg, **inputs)
    cot = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)

    def loss(m: Qwen25VL) -> jax.Array:
        return jnp.sum(m.forward(**prepared) * cot)

    grads = nnx.jit(nnx.grad(loss))(model)  # jit: compiled once, faster than op by op
    # along the NSA layer's gate and value projections (neither moves the block selection):
    # the gates get their gradient, and so do the values through every NSA branch
    graph, state = nnx.split(model)
    at = nnx.jit(loss)
    eps = 1e-2
    for name in ("g_proj_2", "v_proj"):
        kernel = getattr(model.language.layers[1].self_attn, name).kernel[...]
        u = rng.standard_normal(kernel.shape).astype(np.float32)
        u /= np.linalg.norm(u)
        moved = []
        for step in (eps, -eps):
            m = nnx.merge(graph, state)
            getattr(m.language.layers[1].self_attn, name).kernel[...] = kernel + step * u
            moved.append(float(at(m)))
        g = grads["language"]["layers"][1]["self_attn"][name]["kernel"][...]
        np.testing.assert_allclose(float(jnp.sum(g * u)), (moved[0] - moved[1]) / (2 * eps),
                                   rtol=1e-3, err_msg=name)
