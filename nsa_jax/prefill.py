"""Prefill at any length: the prompt through the model one layer at a time, filling the KV cache.

A prompt of an hour of video at 2 fps is ~1M tokens. Run as one program (the model's forward),
its largest arrays are per-layer intermediates (`[T, 18944]` for the 7B MLP) and the vision
tower's activations over every patch (~4M). Here each piece runs as its own compiled call over
the whole prompt, and everything that is per token runs in token chunks inside it:

- the vision tower in chunks of whole temporal patches (`visual_chunks`): its windows and its
  full-attention blocks never cross a frame (`vision.window_index`, `vision.frame_segments`), so
  a chunk's merged features equal those rows of the tower over the whole video; each chunk's
  features are written straight into the embeddings `[B, T, H]` (donated), and a chunk's
  pixels come from any sliceable source: an array, or a video decoded on demand
  (`data.video.VideoPatches`), so the hour's pixels never exist at once;
- each decoder layer: the norm, q/k/v and gate projections in chunks of `token_chunk` tokens
  (`map_tokens`), attention over the whole sequence (`Attention.attend`, O(T) memory on every
  backend), then o_proj, the residuals and the MLP in chunks, written back over the layer's
  input (donated). The layer's keys (RoPE applied) and values go into its cache slots
  `[0, T)` of `[B, L, Hkv, D]` in `cache_dtype` as the layer runs.

So besides the cache and the weights, no array larger than O(T x hidden) is alive: the layer
input, q, k, v, the attention output, and the attention's own O(T) work space. Alike layers
(dense or hybrid) share one compilation. Decoding needs only the cache: generated tokens are
text, and text attends densely (`generate.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from nsa_jax.config import ModelConfig
from nsa_jax.model.language import DecoderLayer, LayerInputs
from nsa_jax.model.vision import VisionInputs
from nsa_jax.model.vlm import Qwen25VL

Array = jax.Array
TOKEN_CHUNK = 8192  # tokens per projection / MLP step: [8192, 18944] bf16 is 0.3 GB for the 7B
VISION_PATCHES = 65536  # patches per vision-tower call (64 temporal patches of 448 x 448)

# per layer (keys, values), each [B, L, Hkv, D] with RoPE applied to the keys
Cache = tuple[tuple[Array, Array], ...]


class PatchRows(Protocol):
    """Pixel rows `[N, patch_dim]` read by slices of whole temporal patches: a NumPy array, or a
    video decoded on demand (`data.video.VideoPatches`)."""

    shape: tuple[int, ...]

    def __getitem__(self, rows: slice) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Visual:
    """All images (or all videos) of a prompt: `pixels` rows of every item in order,
    `grid: [V, 3]` (t, h, w) patches of each."""

    pixels: PatchRows
    grid: np.ndarray


@dataclasses.dataclass(frozen=True)
class VisualChunk:
    """Temporal patches `[t0, t1)` of one item: its pixel rows `rows`, its merged features
    `feats` (both `slice`s into the flat order of all items) and its own grid `(t1 - t0, h, w)`."""

    rows: slice
    feats: slice
    grid: tuple[int, int, int]


def visual_chunks(grid: np.ndarray, max_patches: int, merge: int) -> list[VisualChunk]:
    """Splits items of `grid: [V, 3]` into runs of whole temporal patches of at most
    `max_patches` patches (at least one temporal patch each)."""
    chunks, row = [], 0
    unit = merge * merge
    for t, h, w in np.asarray(grid).reshape(-1, 3).tolist():
        step = max(1, max_patches // (h * w))
        for t0 in range(0, t, step):
            n = min(step, t - t0) * h * w
            chunks.append(
                VisualChunk(
                    slice(row, row + n),
                    slice(row // unit, (row + n) // unit),
                    (min(step, t - t0), h, w),
                )
            )
            row += n
    return chunks


def map_tokens(f: Callable[..., Any], arrays: Sequence[Array], chunk: int, into: Any = None) -> Any:
    """`f` over runs of at most `chunk` tokens of `arrays` (each `[B, T, ...]`), its outputs
    (`[B, c, ...]` each) written at their tokens into `into` (a pytree of `[B, T, ...]`
    buffers, zeros by default): equal to `f(*arrays)` for a per-token `f`, holding one chunk
    of `f`'s intermediates at a time. Writing into an input (donated) reuses its memory."""
    t = arrays[0].shape[1]
    c = min(chunk, t)
    n, tail = divmod(t, c)
    if n == 1 and not tail:  # one chunk (a token-sharded layer's): no loop, no slices
        ys = f(*arrays)
        return ys if into is None else jax.tree.map(lambda o, y: y.astype(o.dtype), into, ys)
    if into is None:
        shapes = jax.eval_shape(f, *(a[:, :c] for a in arrays))
        into = jax.tree.map(lambda s: jnp.zeros((s.shape[0], t, *s.shape[2:]), s.dtype), shapes)

    def put(out: Any, start: Any, size: int) -> Any:
        ys = f(*(jax.lax.dynamic_slice_in_dim(a, start, size, axis=1) for a in arrays))
        return jax.tree.map(
            lambda o, y: jax.lax.dynamic_update_slice_in_dim(o, y.astype(o.dtype), start, axis=1),
            out,
            ys,
        )

    out = jax.lax.fori_loop(0, n, lambda i, out: put(out, i * c, c), into)
    return put(out, n * c, tail) if tail else out


def prefill_layer(
    layer: DecoderLayer,
    x: Array,
    li: LayerInputs,
    cache_len: int,
    cache_dtype: jnp.dtype,
    chunk: int,
) -> tuple[Array, tuple[Array, Array]]:
    """One decoder layer over the whole prompt `x: [B, T, H]`, per-token work in chunks of
    `chunk` tokens: the layer's output `[B, T, H]` (written over `x`) and its cache entry,
    keys (RoPE applied) and values `[B, cache_len, Hkv, D]` in `cache_dtype`, zeros past T.

    With `li.sequence_parallel` the tokens are sharded over its axis (context parallelism:
    `nsa-jax tpu-compile --prefill`): pass `chunk >= T`, each shard's tokens being few, since
    a chunk sliced out of a sharded axis would gather it."""
    a = layer.self_attn
    b, t, _ = x.shape

    def project(x: Array, cos: Array, sin: Array) -> tuple[Array, ...]:
        return a.project(layer.input_layernorm(x), cos, sin)

    q, k, v, logits = map_tokens(project, (x, li.cos, li.sin), chunk)
    o = a.attend(q, k, v, logits, li)

    def finish(x: Array, o: Array) -> Array:
        x = x + a.o_proj(o.reshape(*o.shape[:2], -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    x = map_tokens(finish, (x, o), chunk, into=x)

    sp = li.sequence_parallel
    shard = (lambda y: y) if sp is None else sp.shard_tokens  # the cache on token shards too

    def cached(y: Array) -> Array:
        buf = jnp.zeros((b, cache_len, *y.shape[2:]), cache_dtype)
        return shard(jax.lax.dynamic_update_slice_in_dim(buf, y.astype(cache_dtype), 0, axis=1))

    return shard(x), (cached(k), cached(v))


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "cache_len", "cache_dtype", "chunk"),
    donate_argnames=("x",),
)
def jit_prefill_layer(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    x: Array,
    li: LayerInputs,
    cache_len: int,
    cache_dtype: jnp.dtype,
    chunk: int,
) -> tuple[Array, tuple[Array, Array]]:
    return prefill_layer(nnx.merge(graphdef, state), x, li, cache_len, cache_dtype, chunk)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def jit_tower(
    graphdef: nnx.GraphDef, state: nnx.State, pixels: Array, inputs: VisionInputs
) -> Array:
    """The vision tower over one chunk's `pixels`: merged features `[M, out_hidden]` (one
    compilation per chunk shape, whatever the prompt's length)."""
    return nnx.merge(graphdef, state)(pixels, inputs)


@functools.partial(jax.jit, donate_argnames=("x",))
def jit_place(x: Array, feats: Array, at: Array) -> Array:
    """`feats: [M, H]` written into `x: [B, T, H]` at the flat token positions `at: [M]`
    (`x` donated: in place)."""
    b, t, h = x.shape
    return x.reshape(b * t, h).at[at].set(feats.astype(x.dtype)).reshape(b, t, h)


@functools.partial(jax.jit, static_argnames=("graphdef", "text_rows"))
def jit_embed(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: Array,
    position_ids: Array,
    segment_ids: Array | None,
    text_rows: int | None,
) -> tuple[Array, LayerInputs]:
    """Token embeddings `[B, T, H]` and the layers' inputs (mRoPE tables, routing)."""
    model = nnx.merge(graphdef, state)
    li = model.language.layer_inputs(
        position_ids, segment_ids, input_ids == model.cfg.video_token_id, text_rows
    )
    return model.language.embed_tokens(input_ids), li


@functools.partial(jax.jit, static_argnames=("graphdef",))
def jit_last_logits(graphdef: nnx.GraphDef, state: nnx.State, x: Array, last: Array) -> Array:
    """f32 logits `[B, vocab]` of `x: [B, T, H]` at each row's token `last: [B]`."""
    model = nnx.merge(graphdef, state)
    h = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return model.logits(model.language.norm(h))


def check_one_sample_per_row(segment_ids: np.ndarray | None) -> None:
    """Generation continues one sample per row: refuses packed rows (segment ids above 1)."""
    if segment_ids is not None and int(np.max(segment_ids, initial=0)) > 1:
        raise ValueError(
            "segment_ids: packed samples (ids above 1) cannot be prefilled for generation, "
            "which continues one prompt per row; give each prompt its own row (attention_mask)"
        )


def place_visual(
    model: Qwen25VL, x: Array, visual: Visual, at: np.ndarray, name: str, max_patches: int, bar: Any
) -> Array:
    """The tower over `visual` in chunks of whole temporal patches, features into `x` at the
    flat positions `at` of its placeholder tokens."""
    cfg = model.cfg.vision
    grid = np.asarray(visual.grid).reshape(-1, 3).astype(np.int64)
    n_feats = int(grid.prod(-1).sum()) // cfg.spatial_merge_size**2
    if at.size != n_feats:
        raise ValueError(
            f"{name} features and {name} tokens do not match: tokens {at.size}, features {n_feats}"
        )
    if visual.pixels.shape[0] != int(grid.prod(-1).sum()):
        raise ValueError(
            f"{name} pixels: {visual.pixels.shape[0]} rows for grids of "
            f"{int(grid.prod(-1).sum())} patches"
        )
    graphdef, state = nnx.split(model.visual)
    inputs: dict[tuple[int, int, int], VisionInputs] = {}
    for c in visual_chunks(grid, max_patches, cfg.spatial_merge_size):
        if c.grid not in inputs:
            inputs[c.grid] = jax.tree.map(
                jnp.asarray, VisionInputs.from_grid(np.asarray([c.grid]), cfg)
            )
        pixels = jnp.asarray(np.asarray(visual.pixels[c.rows], np.float32))
        feats = jit_tower(graphdef, state, pixels, inputs[c.grid])
        x = jit_place(x, feats, jnp.asarray(at[c.feats], jnp.int32))
        bar.update(c.grid[0] * cfg.temporal_patch_size)
    return x


def prefill(
    model: Qwen25VL,
    input_ids: Any,
    position_ids: Array,
    segment_ids: Array | None,
    images: Visual | None,
    videos: Visual | None,
    cache_len: int,
    text_rows: int | None = None,
    *,
    token_chunk: int | None = None,
    vision_patches: int | None = None,
    cache_dtype: jnp.dtype | None = None,
    progress: bool = False,
    on_phase: Callable[[str, float], None] | None = None,
) -> tuple[Array, Cache]:
    """Runs the prompt through the model one layer at a time and fills the cache.

    Args:
      input_ids: `[B, T]`; position_ids: `[B, 3, T]`; segment_ids: `[B, T]` (0 at padding,
        1 elsewhere) or None (no padding); text_rows: as `Qwen25VL.prepare` gives them.
      images, videos: their pixels (any `PatchRows`: arrays, or videos decoded on demand)
        and grids.
      cache_len: `L >= T`, the cache length.
      token_chunk: tokens per step of the per-token work (None: `TOKEN_CHUNK`);
        vision_patches: patches per tower call (None: `VISION_PATCHES`).
      cache_dtype: the cache's dtype (None: the model's activations').
      progress: show frames through the tower and layers prefilled (tqdm, with tokens/s).
      on_phase: called with `("vision", seconds)` once the tower is done, then `("layer",
        seconds)` after each layer (each waited for: for measurements).

    Returns:
      logits `[B, vocab]` f32 at each row's last real token, and the cache (prompt keys and
      values at slots `[0, T)`, zeros after).
    """
    cfg: ModelConfig = model.cfg
    token_chunk = TOKEN_CHUNK if token_chunk is None else token_chunk
    vision_patches = VISION_PATCHES if vision_patches is None else vision_patches
    ids = np.asarray(input_ids)
    b, t = ids.shape
    if cache_len < t:
        raise ValueError(f"cache_len {cache_len} is shorter than the prompt ({t} tokens)")
    seg = None if segment_ids is None else np.asarray(segment_ids)
    check_one_sample_per_row(seg)
    graphdef, state = nnx.split(model)
    x, li = jit_embed(
        graphdef,
        state,
        jnp.asarray(ids),
        position_ids,
        None if seg is None else jnp.asarray(seg),
        text_rows,
    )
    visuals = [
        (v, name, token)
        for v, name, token in (
            (images, "image", cfg.image_token_id),
            (videos, "video", cfg.video_token_id),
        )
        if v is not None
    ]
    frames = sum(int(np.asarray(v.grid).reshape(-1, 3)[:, 0].sum()) for v, _, _ in visuals)
    start = time.perf_counter()
    with tqdm(
        total=frames * cfg.vision.temporal_patch_size,
        unit="frame",
        desc="vision",
        leave=False,
        disable=not progress or not frames,
    ) as bar:
        for visual, name, token in visuals:
            at = np.flatnonzero(ids.reshape(-1) == token)
            x = place_visual(model, x, visual, at, name, vision_patches, bar)
    if on_phase is not None:
        x.block_until_ready()
        on_phase("vision", time.perf_counter() - start)
    dtype = jnp.dtype(cache_dtype if cache_dtype is not None else x.dtype)
    cache = []
    start = time.perf_counter()
    with tqdm(
        total=cfg.text.num_hidden_layers,
        unit="layer",
        desc="prefill",
        leave=False,
        disable=not progress,
    ) as bar:
        layer_start = start
        for lg, ls in model.language.layer_states():
            x, kv = jit_prefill_layer(lg, ls, x, li, cache_len, dtype, token_chunk)
            cache.append(kv)
            if progress or on_phase is not None:
                x.block_until_ready()
                now = time.perf_counter()
                if on_phase is not None:
                    on_phase("layer", now - layer_start)
                layer_start = now
                bar.update()
                # the whole prompt's rate at the layers' pace so far
                rate = b * t * bar.n / bar.total / (now - start)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s")
    real = np.ones((b, t), bool) if seg is None else seg > 0
    last = t - 1 - np.argmax(real[:, ::-1], axis=1)  # right padding puts it before the padding
    return jit_last_logits(graphdef, state, x, jnp.asarray(last, jnp.int32)), tuple(cache)
