"""Generation: prefill + KV-cache decoding against transformers' `generate` and against a full
recompute of the sequence, sampling, stop tokens and padded batches (CPU, f32)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nsa_jax import generate as gen
from nsa_jax.config import preset
from nsa_jax.convert import load_model
from nsa_jax.generate import cache_length, generate, jit_decode, sample_tokens, visual_rows
from nsa_jax.model.inputs import prepare
from nsa_jax.model.rope import token_types
from nsa_jax.model.vlm import init_model
from nsa_jax.prefill import prefill

from hf_fixtures import TINY, make_tiny_hf_checkpoint, random_prompt

# NSA in the second layer only (compiles in half the time); the first layer stays dense
NSA = dataclasses.replace(preset("videonsa-7b-clean").nsa, block_size=4, num_selected=2, window=6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny_hf")
    hf = make_tiny_hf_checkpoint(str(path))
    return hf, load_model(path)


def hf_generate(hf, inputs: dict[str, np.ndarray], n: int) -> np.ndarray:
    kw = {k: torch.as_tensor(v) for k, v in inputs.items()}
    # transformers 5 needs the modality of each token, or it gives video tokens text positions
    kw["mm_token_type_ids"] = torch.as_tensor(
        token_types(inputs["input_ids"], TINY.image_token_id, TINY.video_token_id)
    )
    with torch.no_grad():
        out = hf.generate(**kw, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1] :].numpy()


def pad_batch(prompts: list[dict[str, np.ndarray]], side: str) -> dict[str, np.ndarray]:
    """One batch of prompts padded on `side`, visual inputs concatenated in row order."""
    lengths = [p["input_ids"].shape[1] for p in prompts]
    t = max(lengths)
    ids, mask = np.zeros((len(prompts), t), np.int64), np.zeros((len(prompts), t), np.int64)
    for row, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        ids[row, cols], mask[row, cols] = p["input_ids"][0], 1
    out = {"input_ids": ids, "attention_mask": mask}
    for key in ("pixel_values_videos", "video_grid_thw"):
        if key in prompts[0]:
            out[key] = np.concatenate([p[key] for p in prompts])
    return out


def test_greedy_generation_equals_transformers_token_for_token(tiny, rng):
    hf, model = tiny
    inputs = random_prompt(rng, videos=((2, 4, 6),))
    inputs["second_per_grid_ts"] = np.asarray([0.5], np.float32)
    ours = generate(model, **inputs, max_new_tokens=10)
    assert ours.shape == (1, 10) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, hf_generate(hf, inputs, 10))


def test_a_left_padded_batch_equals_transformers_token_for_token(tiny, rng):
    hf, model = tiny
    batch = pad_batch(
        [
            random_prompt(rng, videos=((2, 4, 4),), text_len=3),
            random_prompt(rng, videos=((2, 2, 4),), text_len=9),
        ],
        "left",
    )
    np.testing.assert_array_equal(
        generate(model, **batch, max_new_tokens=6), hf_generate(hf, batch, 6)
    )


def test_with_nsa_cached_decoding_equals_a_full_recompute_at_every_step(rng):
    model = init_model(TINY.with_attention(nsa=NSA, layers=(1,)), seed=4)
    # a video long enough for several NSA blocks, then text
    inputs = random_prompt(rng, videos=((2, 8, 8),), text_len=4)
    video = {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw")}
    steps = 4
    tokens = generate(model, **inputs, max_new_tokens=steps)[0]
    # the model is causal, so one forward over the prompt and the new tokens gives the full
    # recompute of every step at once: step s's logits sit at position t - 1 + s
    t = inputs["input_ids"].shape[1]
    ids = np.concatenate([inputs["input_ids"], tokens[None, :-1]], 1)
    full = np.asarray(model(ids, **video))[0, t - 1 :]
    np.testing.assert_array_equal(np.argmax(full, -1), tokens)
    # the cached path, step by step, through the functions `generate` compiled
    prepared = prepare(model.cfg, inputs["input_ids"], **video)
    length = cache_length(t, steps)
    graphdef, state = nnx.split(model)
    videos = visual_rows(video["pixel_values_videos"], video["video_grid_thw"], "videos")
    logits, cache = prefill(model, prepared["input_ids"], prepared["position_ids"], None, None,
                            videos, length, prepared["text_rows"])
    key_mask = jnp.asarray(np.arange(length)[None] < t)
    next_pos = int(np.asarray(prepared["position_ids"]).max()) + 1
    greedy = dict(temperature=jnp.float32(0), top_k=jnp.int32(0), top_p=jnp.float32(1))
    for s in range(steps):
        np.testing.assert_allclose(np.asarray(logits)[0], full[s], atol=2e-5 * np.abs(full).max())
        _, logits, cache, key_mask = jit_decode(
            graphdef,
            state,
            jnp.asarray(tokens[s : s + 1]),
            jnp.asarray([next_pos + s], jnp.int32),
            cache,
            key_mask,
            jnp.int32(t + s),
            jax.random.PRNGKey(0),
            **greedy,
        )


def test_a_right_padded_batch_generates_each_prompt_as_it_does_alone(tiny, rng):
    _, model = tiny  # text only: the left-padded test above has the videos
    short, long = random_prompt(rng, text_len=4), random_prompt(rng, text_len=9)
    batch = generate(model, **pad_batch([short, long], "right"), max_new_tokens=5)
    np.testing.assert_array_equal(batch[0], generate(model, **short, max_new_tokens=5)[0])
    np.testing.assert_array_equal(batch[1], generate(model, **long, max_new_tokens=5)[0])


@pytest.mark.slow
def test_with_nsa_a_right_padded_prompt_generates_as_it_does_alone(rng):
    model = init_model(TINY.with_attention(nsa=NSA, layers=(1,)), seed=5)
    short = random_prompt(rng, videos=((2, 4, 8),), text_len=3)
    long = random_prompt(rng, videos=((2, 8, 8),), text_len=6)
    batch = generate(model, **pad_batch([short, long], "right"), max_new_tokens=5)
    np.testing.assert_array_equal(batch[0], generate(model, **short, max_new_tokens=5)[0])


def test_stop_tokens_end_a_row_and_pad_it_until_every_row_stops(tiny, rng):
    _, model = tiny
    a, b = random_prompt(rng, text_len=6), random_prompt(rng, text_len=6)
    ids = np.concatenate([a["input_ids"], b["input_ids"]])
    free = generate(model, input_ids=ids, max_new_tokens=8)
    stop = int(free[0, 2])
    assert stop not in free[0, :2]
    got = generate(model, input_ids=ids, max_new_tokens=8, eos_token_id=[stop, 999])

    def end(row: np.ndarray) -> int:  # tokens up to and including the first stop token
        hits = np.flatnonzero(np.isin(row, [stop, 999]))
        return int(hits[0]) + 1 if hits.size else len(row)

    ends = [end(free[0]), end(free[1])]
    assert ends[0] == 3 and got.shape == (2, max(ends))
    for row, e in enumerate(ends):
        np.testing.assert_array_equal(got[row, :e], free[row, :e])
        assert (got[row, e:] == stop).all()


def test_decoding_compiles_once_per_cache_bucket(tiny, rng, monkeypatch):
    """Prompts of three lengths whose caches fit one `CACHE_BUCKET` decode with one program,
    step after step; a prompt past the bucket traces the decode step once more. `decode_step`
    runs once per trace of `jit_decode`, so its calls count the traces."""
    _, model = tiny
    gen.jit_decode.clear_cache()  # earlier tests' programs would hide the first trace
    chex.clear_trace_counter()
    monkeypatch.setattr(gen, "decode_step", chex.assert_max_traces(gen.decode_step, n=1))
    for n in (3, 9, 30):
        generate(model, **random_prompt(rng, text_len=n), max_new_tokens=4)
    with pytest.raises(AssertionError, match="traced > 1 times"):
        generate(model, **random_prompt(rng, text_len=gen.CACHE_BUCKET), max_new_tokens=4)


def test_sampling_is_seeded_and_respects_top_k_and_top_p():
    logits = jnp.asarray(np.log([[0.5, 0.3, 0.15, 0.05]] * 512, dtype=np.float32))
    key = jax.random.PRNGKey(0)

    def draw(temperature: float, top_k: int, top_p: float, key=key) -> np.ndarray:
        return np.asarray(
            sample_tokens(
                logits,
                key,
                temperature=jnp.float32(temperature),
                top_k=jnp.int32(top_k),
                top_p=jnp.float32(top_p),
            )
        )

    np.testing.assert_array_equal(draw(temperature=0.0, top_k=0, top_p=1.0), 0)
    full = draw(temperature=1.0, top_k=0, top_p=1.0)
    assert set(full.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(full, draw(temperature=1.0, top_k=0, top_p=1.0))
    assert set(draw(temperature=1.0, top_k=2, top_p=1.0).tolist()) == {0, 1}
    # nucleus 0.7: tokens 0 (0.5) and 1 (0.3) reach it; token 2 is left out
    assert set(draw(temperature=1.0, top_k=0, top_p=0.7).tolist()) == {0, 1}
    np.testing.assert_array_equal(draw(temperature=1.0, top_k=1, top_p=1.0), 0)
    other = draw(temperature=1.0, top_k=0, top_p=1.0, key=jax.random.PRNGKey(1))
    assert (other != full).any()


def test_sampled_generation_is_reproducible_by_seed(tiny, rng):
    _, model = tiny
    ids = random_prompt(rng, text_len=5)["input_ids"]
    kw = dict(input_ids=ids, max_new_tokens=6, temperature=1.5, top_k=50, top_p=0.9)
    a, b = generate(model, **kw, seed=1), generate(model, **kw, seed=1)
    np.testing.assert_array_equal(a, b)
    assert (generate(model, **kw, seed=2) != a).any()
