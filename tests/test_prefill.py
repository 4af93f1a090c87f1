"""The layer-by-layer prefill (`nsa_jax/prefill.py`) against the whole model at once: last-token
logits and every layer's cache, NSA off and on, the tower in frame chunks and the per-token
work in token chunks; packed prompts refused; compiled memory linear in the tokens (CPU, f32)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nsa_jax.config import preset
from nsa_jax.generate import visual_rows
from nsa_jax.model.inputs import prepare
from nsa_jax.model.vlm import Qwen25VL, init_model, scatter_features
from nsa_jax.prefill import Visual, jit_prefill_layer, prefill, visual_chunks

from hf_fixtures import TINY, random_prompt

NSA = dataclasses.replace(preset("videonsa-7b-clean").nsa, block_size=4, num_selected=2, window=6)


@nnx.jit(static_argnames="text_rows")
def whole_model_prefill(model: Qwen25VL, prepared: dict, text_rows: int | None) -> tuple:
    """The reference: the model's own layers over the whole prompt at once (tower over every
    patch, `layer(x, li)`): logits `[B, T, vocab]` and each layer's keys and values,
    projected from its input."""
    cfg = model.cfg
    ids = prepared["input_ids"]
    x = model.language.embed_tokens(ids)
    for name, token in (("images", cfg.image_token_id), ("videos", cfg.video_token_id)):
        if prepared[name] is not None:
            v = prepared[name]
            x = scatter_features(x, ids == token, model.visual(v.pixels, v.inputs))
    li = model.language.layer_inputs(
        prepared["position_ids"], prepared["segment_ids"], ids == cfg.video_token_id, text_rows
    )
    cache = []
    for layer in model.language.layers:
        _, k, v, _ = layer.self_attn.project(layer.input_layernorm(x), li.cos, li.sin)
        cache.append((k, v))
        x = layer(x, li)
    return model.logits(model.language.norm(x)), cache


@pytest.mark.parametrize("nsa", [None, NSA], ids=["dense", "hybrid"])
def test_layer_by_layer_prefill_equals_the_whole_model(nsa, rng):
    # an image, then a video of 6 temporal patches through the tower 2 at a time; 7 tokens a
    # chunk (a ragged tail); the hybrid layer is the second (the first stays dense)
    model = init_model(TINY.with_attention(nsa=nsa, layers=None if nsa is None else (1,)), seed=3)
    inputs = random_prompt(rng, images=((1, 4, 4),), videos=((6, 4, 6),), text_len=5)
    prepared = prepare(model.cfg, **inputs)
    text_rows = prepared.pop("text_rows")
    ref_logits, ref_cache = jax.tree.map(
        np.asarray, whole_model_prefill(model, prepared, text_rows)
    )
    t = inputs["input_ids"].shape[1]
    logits, cache = prefill(
        model,
        prepared["input_ids"],
        prepared["position_ids"],
        None,
        visual_rows(inputs["pixel_values"], inputs["image_grid_thw"], "pixel_values"),
        visual_rows(inputs["pixel_values_videos"], inputs["video_grid_thw"], "videos"),
        cache_len=t + 9,
        text_rows=text_rows,
        token_chunk=7,
        vision_patches=48,
    )
    scale = np.abs(ref_logits).max()
    np.testing.assert_allclose(np.asarray(logits)[0], ref_logits[0, -1], atol=1e-5 * scale)
    assert len(cache) == len(ref_cache)
    for (k, v), (rk, rv) in zip(cache, ref_cache, strict=True):
        assert k.shape == (1, t + 9, *rk.shape[2:]) and k.dtype == jnp.float32
        for got, want in ((k, rk), (v, rv)):
            np.testing.assert_allclose(np.asarray(got)[:, :t], want, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(got)[:, t:], 0)


def test_prefill_in_bf16_writes_a_bf16_cache_close_to_the_f32_one(rng):
    model = init_model(TINY.with_attention(nsa=NSA, layers=(1,)), seed=3)
    inputs = random_prompt(rng, videos=((4, 4, 4),))
    prepared = prepare(model.cfg, **inputs)
    t = inputs["input_ids"].shape[1]
    videos = visual_rows(inputs["pixel_values_videos"], inputs["video_grid_thw"], "videos")
    args = (prepared["input_ids"], prepared["position_ids"], None, None, videos, t)
    logits, cache = prefill(model, *args, text_rows=prepared["text_rows"], token_chunk=16)
    logits16, cache16 = prefill(
        model, *args, text_rows=prepared["text_rows"], token_chunk=16, cache_dtype=jnp.bfloat16
    )
    np.testing.assert_array_equal(np.asarray(logits16), np.asarray(logits))
    for (k, v), (k16, v16) in zip(cache, cache16, strict=True):
        assert k16.dtype == v16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(k16), np.asarray(k.astype(jnp.bfloat16)))
        np.testing.assert_array_equal(np.asarray(v16), np.asarray(v.astype(jnp.bfloat16)))


def test_visual_chunks_cover_every_patch_in_whole_temporal_patches():
    grid = np.asarray([[5, 4, 6], [1, 2, 2], [3, 4, 4]])
    chunks = visual_chunks(grid, max_patches=50, merge=2)
    assert [c.grid for c in chunks] == [(2, 4, 6), (2, 4, 6), (1, 4, 6), (1, 2, 2), (3, 4, 4)]
    rows = np.concatenate([np.arange(c.rows.start, c.rows.stop) for c in chunks])
    feats = np.concatenate([np.arange(c.feats.start, c.feats.stop) for c in chunks])
    np.testing.assert_array_equal(rows, np.arange(int(grid.prod(-1).sum())))
    np.testing.assert_array_equal(feats, np.arange(int(grid.prod(-1).sum()) // 4))


def test_packed_prompts_and_mismatched_pixels_are_refused(rng):
    model = init_model(TINY)
    inputs = random_prompt(rng, videos=((2, 4, 4),))
    prepared = prepare(model.cfg, **inputs)
    t = inputs["input_ids"].shape[1]
    videos = visual_rows(inputs["pixel_values_videos"], inputs["video_grid_thw"], "videos")
    packed = np.ones((1, t), np.int32)
    packed[:, t // 2 :] = 2
    with pytest.raises(ValueError, match="segment_ids: packed samples"):
        prefill(model, prepared["input_ids"], prepared["position_ids"], packed, None, videos, t)
    short = Visual(inputs["pixel_values_videos"][:-16], videos.grid)
    with pytest.raises(ValueError, match="video pixels: 16 rows for grids of 32 patches"):
        prefill(model, prepared["input_ids"], prepared["position_ids"], None, None, short, t)


def layer_temp_bytes(nsa, tokens: int) -> int:
    """Compiled temporary bytes of one decoder layer's prefill over `tokens` tokens (~95%
    video), 256 tokens a chunk; with NSA, the hybrid layer."""
    cfg = TINY.with_attention(nsa=nsa, layers=None if nsa is None else (0,))
    model = init_model(cfg)
    ids = np.full((1, tokens), cfg.video_token_id, np.int32)
    ids[0, ::20] = 7  # text rows among the video
    li = model.language.layer_inputs(
        jnp.zeros((1, 3, tokens), jnp.int32),
        None,
        jnp.asarray(ids == cfg.video_token_id),
        text_rows=tokens // 16,
    )
    graphdef, state = nnx.split(model.language.layers[0])
    x = jax.ShapeDtypeStruct((1, tokens, cfg.text.hidden_size), jnp.float32)
    compiled = jit_prefill_layer.lower(graphdef, state, x, li, tokens, jnp.float32, 256).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("nsa", [None, NSA], ids=["dense", "hybrid"])
def test_a_prefill_layer_compiles_to_memory_linear_in_tokens(nsa):
    # 4x the tokens may take at most 5x the temporary memory (a [T, T] or [T, T / block] array
    # would give ~16x)
    small, large = (layer_temp_bytes(nsa, t) for t in (2048, 8192))
    assert large <= 5 * small, f"{small} -> {large} bytes ({large / small:.1f}x)"


def test_a_scanned_model_prefills_as_its_per_layer_twin(rng):
    # scan_layers stores each run of alike layers stacked: the prefill slices them one by one
    cfg = TINY.with_attention(nsa=NSA, layers=(1,))
    inputs = random_prompt(rng, videos=((2, 4, 4),))
    t = inputs["input_ids"].shape[1]
    outs = []
    for scan in (False, True):
        model = init_model(cfg.replace(scan_layers=scan), seed=3)  # the same initial values
        prepared = prepare(model.cfg, **inputs)
        videos = visual_rows(inputs["pixel_values_videos"], inputs["video_grid_thw"], "videos")
        outs.append(
            prefill(
                model,
                prepared["input_ids"],
                prepared["position_ids"],
                None,
                None,
                videos,
                t,
                prepared["text_rows"],
            )
        )
    (logits, cache), (logits_s, cache_s) = outs
    np.testing.assert_array_equal(np.asarray(logits_s), np.asarray(logits))
    for a, b in zip(jax.tree.leaves(cache_s), jax.tree.leaves(cache), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
