"""Text generation: prefill the prompt through the model's own layers, then decode with a KV cache.

The prompt (text, images, videos) runs once through every decoder layer, hybrid dense/NSA
attention included, one layer at a time with the per-token work in chunks (`prefill.py`: an hour
of video, ~1M tokens, fits one GPU), and each layer's keys and values (RoPE applied) are written
into a cache preallocated for the prompt plus the new tokens, rounded up to a multiple of
`CACHE_BUCKET` so the decode step compiles once per bucket. Generated tokens are text, and a
text query attends densely to every earlier token, so each decode step is dense attention of
one query per row over the cache: exact for the clean hybrid form. Under `videonsa_compat` the
released code also decoded with plain dense attention (its shortcut for all-text steps), which
is what this does; a full recompute there would add the NSA branch it runs at text rows.

Positions: a new token's mRoPE position is (on all three axes) one more than the largest
position of its row's prompt, plus the step, as transformers' `rope_deltas` give it. Padding on
either side is masked out of the cache; new tokens are written after the padded prompt, so a
row's real tokens keep their order (with NSA layers pad on the right: see `Qwen25VL.__call__`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.model import rope
from nsa_jax.model.inputs import flat_visual, prepare
from nsa_jax.model.language import DecoderLayer
from nsa_jax.model.vlm import Qwen25VL
from nsa_jax.prefill import Cache, PatchRows, Visual, prefill

Array = jax.Array
CACHE_BUCKET = 256  # cache lengths are multiples of this: one decode compilation per bucket


def cache_length(prompt_len: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    """The cache length for a prompt of `prompt_len` tokens and `max_new_tokens` new ones:
    their sum rounded up to a multiple of `bucket`."""
    return -(-(prompt_len + max_new_tokens) // bucket) * bucket


def head_logits(model: Qwen25VL, h: Array) -> Array:
    """Final norm and LM head: hidden states `[..., H]` -> f32 logits `[..., vocab]`."""
    return model.logits(model.language.norm(h))


def decode_layer(
    layer: DecoderLayer,
    x: Array,
    cos: Array,
    sin: Array,
    kv: tuple[Array, Array],
    key_mask: Array,
    slot: Array,
) -> tuple[Array, tuple[Array, Array]]:
    """One decoder layer for one new token per row: `x: [B, 1, H]`, cos/sin `[B, 1, D]`, the
    layer's cache `[B, L, Hkv, D]` x 2, `key_mask: [B, L]` (True where a slot holds a real
    token, this step's slot included), `slot`: where this token's key and value go."""
    a = layer.self_attn
    b = x.shape[0]
    h = layer.input_layernorm(x)
    q, k_new, v_new, _ = a.project(h, cos, sin)  # the gate logits go unused (removed by XLA)
    k = jax.lax.dynamic_update_slice(kv[0], k_new.astype(kv[0].dtype), (0, slot, 0, 0))
    v = jax.lax.dynamic_update_slice(kv[1], v_new.astype(kv[1].dtype), (0, slot, 0, 0))
    o = jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :])
    x = x + a.o_proj(o.reshape(b, 1, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, (k, v)


def decode_step(
    model: Qwen25VL,
    tokens: Array,
    positions: Array,
    cache: Cache,
    key_mask: Array,
    slot: Array,
) -> tuple[Array, Cache]:
    """Logits `[B, vocab]` f32 after the new tokens `[B]` at mRoPE positions `[B]` (text: the
    same on all three axes), written at cache slot `slot`; returns the updated cache."""
    t = model.cfg.text
    x = model.language.embed_tokens(tokens[:, None])
    pos = jnp.broadcast_to(positions[None, :, None], (3, *positions.shape, 1))
    cos, sin = rope.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
    new_cache = []
    for (graphdef, state), kv in zip(model.language.layer_states(), cache, strict=True):
        x, kv = decode_layer(nnx.merge(graphdef, state), x, cos, sin, kv, key_mask, slot)
        new_cache.append(kv)
    return head_logits(model, x[:, 0]), tuple(new_cache)


def sample_tokens(
    logits: Array, key: Array, *, temperature: Array, top_k: Array, top_p: Array
) -> Array:
    """Next tokens `[B]` int32 from logits `[B, vocab]`: argmax when `temperature == 0`; else
    `logits / temperature`, then the `top_k` largest (0: all), then the smallest set whose
    probability reaches `top_p` (1: all), then a draw (transformers' order of warpers).

    The three settings are traced scalars, so one compilation serves every setting.
    """
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, -1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, -1)
    before = jnp.cumsum(probs, -1) - probs  # probability of the better tokens
    ranked = jnp.where(before < top_p, ranked, -jnp.inf)  # the best token is always kept
    drawn = jnp.take_along_axis(order, jax.random.categorical(key, ranked, -1)[:, None], -1)
    return jnp.where(temperature > 0, drawn[:, 0], greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "key_mask"))
def jit_decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: Array,
    positions: Array,
    cache: Cache,
    key_mask: Array,
    slot: Array,
    key: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
) -> tuple[Array, Array, Cache, Array]:
    """One decode step: the next tokens `[B]`, the logits `[B, vocab]` they were drawn from,
    the cache, and `key_mask` with `slot` marked real."""
    model = nnx.merge(graphdef, state)
    key_mask = jax.lax.dynamic_update_slice(
        key_mask, jnp.ones((key_mask.shape[0], 1), bool), (0, slot)
    )
    logits, cache = decode_step(model, tokens, positions, cache, key_mask, slot)
    nxt = sample_tokens(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
    return nxt, logits, cache, key_mask


@jax.jit
def jit_sample(logits: Array, key: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    return sample_tokens(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)


def visual_rows(pixels: Any, grid: Any, name: str) -> Visual | None:
    """`pixels` with their grids as the prefill reads them: per-row layouts (`[B, P, D]`,
    `[B, V, 3]`) flattened, flat pixels (an array or any `PatchRows`) kept as they are."""
    if grid is None:
        if pixels is not None:
            raise ValueError(f"{name} given without its grid_thw")
        return None
    if pixels is None:
        raise ValueError(f"{name}: a grid_thw given without its pixels")
    if np.ndim(grid) == 3:
        pixels, grid, _ = flat_visual(pixels, grid, None)
    rows: PatchRows = pixels if hasattr(pixels, "shape") else np.asarray(pixels)  # lists too
    return Visual(rows, np.asarray(grid).reshape(-1, 3).astype(np.int64))


def generate(
    model: Qwen25VL,
    *,
    input_ids: Any,
    max_new_tokens: int,
    attention_mask: Any = None,
    pixel_values: Any = None,
    image_grid_thw: Any = None,
    pixel_values_videos: Any = None,
    video_grid_thw: Any = None,
    second_per_grid_ts: Any = None,
    mm_token_type_ids: Any = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    on_step: Callable[[np.ndarray], None] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Generates up to `max_new_tokens` tokens after each prompt of a batch.

    Takes the arrays `model(...)` takes (a processor's output: `generate(model,
    **processor_output, max_new_tokens=...)`), NumPy or JAX.

    Args:
      model: the model (`nsa_jax.load_model`).
      input_ids: `[B, T]` prompts, padded on either side (with NSA layers, on the right).
      max_new_tokens: the most tokens to add to each row.
      attention_mask: `[B, T]`, 0 at padding (None: no padding).
      pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts,
        mm_token_type_ids: as `Qwen25VL.__call__` takes them; with flat grids `[V, 3]` the
        pixels may also be rows decoded on demand (`data.video.VideoPatches`), which the
        vision tower reads a chunk at a time.
      temperature: 0 for greedy decoding; otherwise the sampling temperature.
      top_p, top_k: nucleus and top-k filtering for sampling (1.0 and 0: off).
      eos_token_id: stop token(s): a row stops after emitting one, and its later slots hold the
        first stop token; generation ends when every row has stopped.
      seed: the sampling seed (step `s` draws with `fold_in(PRNGKey(seed), s)`).
      on_step: called after each step with that step's tokens `[B]` (for streaming).
      progress: show the prefill's progress (frames through the vision tower, layers, tokens/s).

    Returns:
      int32 `[B, n]`, the new tokens, `n <= max_new_tokens` (fewer when every row stopped).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, "
            f"{top_k}"
        )
    images = visual_rows(pixel_values, image_grid_thw, "pixel_values")
    videos = visual_rows(pixel_values_videos, video_grid_thw, "pixel_values_videos")
    if np.ndim(video_grid_thw) == 3:  # per-row grids: the present videos' seconds
        _, _, second_per_grid_ts = flat_visual(None, video_grid_thw, second_per_grid_ts)
    prepared = prepare(  # positions and routing from the grids: pixels stay aside
        model.cfg,
        input_ids,
        attention_mask=attention_mask,
        image_grid_thw=None if images is None else images.grid,
        video_grid_thw=None if videos is None else videos.grid,
        second_per_grid_ts=second_per_grid_ts,
        mm_token_type_ids=mm_token_type_ids,
    )
    seg = prepared["segment_ids"]
    b, t = prepared["input_ids"].shape
    mask = np.ones((b, t), bool) if seg is None else np.asarray(seg) > 0
    if not mask.any(axis=1).all():
        raise ValueError("every row of attention_mask needs at least one real token")
    stops = [] if eos_token_id is None else np.atleast_1d(eos_token_id).astype(int).tolist()
    length = cache_length(t, max_new_tokens)
    logits, cache = prefill(
        model,
        prepared["input_ids"],
        prepared["position_ids"],
        seg,
        images,
        videos,
        length,
        prepared["text_rows"],
        progress=progress,
    )
    graphdef, state = nnx.split(model)
    pos = np.asarray(prepared["position_ids"])
    next_pos = np.where(mask[:, None], pos, np.iinfo(pos.dtype).min).max(axis=(1, 2)) + 1
    key_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, length - t))))
    sampling = dict(
        temperature=jnp.float32(temperature), top_k=jnp.int32(top_k), top_p=jnp.float32(top_p)
    )
    base = jax.random.PRNGKey(seed)
    tokens = jit_sample(logits, jax.random.fold_in(base, 0), **sampling)
    done = np.zeros(b, bool)
    out: list[np.ndarray] = []
    for step in range(max_new_tokens):
        host = np.asarray(tokens).astype(np.int32)
        if stops:
            host = np.where(done, stops[0], host)
            done |= np.isin(host, stops)
        out.append(host)
        if on_step is not None:
            on_step(host)
        if done.all() or step == max_new_tokens - 1:
            break
        tokens, _, cache, key_mask = jit_decode(
            graphdef,
            state,
            jnp.asarray(host),
            jnp.asarray((next_pos + step).astype(np.int32)),
            cache,
            key_mask,
            jnp.int32(t + step),
            jax.random.fold_in(base, step + 1),
            **sampling,
        )
    return np.stack(out, axis=1)
