"""The whole Qwen2.5-VL / VideoNSA model: vision features scattered at the placeholder tokens,
the language model, the LM head.

`Qwen25VL.__call__` takes exactly what transformers' `Qwen2_5_VLForConditionalGeneration`
forward takes (NumPy or JAX arrays), so a processor output feeds it, and the data pipeline's
batches too (`segment_ids` for packed samples, per-row pixels): `model/inputs.py:prepare`
computes the grid-dependent index arrays on the host (rope index, window partition, the
text-row bucket) and the jit-compiled array function `forward` returns logits or final hidden
states.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.attention.sequence_parallel import SequenceParallel
from nsa_jax.config import ModelConfig
from nsa_jax.model.inputs import VisualBatch, prepare
from nsa_jax.model.language import LanguageModel
from nsa_jax.model.layers import linear
from nsa_jax.model.vision import VisionInputs, VisionTower

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VideoRows:
    """The videos of a batch laid out per row with static shapes (the training step's layout,
    sharded with the batch): `pixels: [B, P, patch_dim]`, each `inputs` field with a leading
    `[B]` axis (`VisionInputs.padded`). A row's real patches come first and its merged features
    follow in its placeholders' order; padding patches are never attended to."""

    pixels: Array
    inputs: VisionInputs


jax.tree_util.register_dataclass(VideoRows, data_fields=["pixels", "inputs"], meta_fields=[])


def scatter_features(embeds: Array, mask: Array, features: Array) -> Array:
    """Writes `features: [M, H]` into `embeds: [B, T, H]` at the `M` True positions of
    `mask: [B, T]`, in row-major order (transformers' `masked_scatter`)."""
    flat = mask.reshape(-1)
    idx = jnp.clip(count_along_tokens(flat[None])[0] - 1, 0, features.shape[0] - 1)
    out = jnp.where(
        flat[:, None], features[idx].astype(embeds.dtype), embeds.reshape(flat.size, -1)
    )
    return out.reshape(embeds.shape)


def count_along_tokens(mask: Array) -> Array:
    """Inclusive running count of `mask: [B, T]` along the tokens: `[B, T]` int32, equal to
    `jnp.cumsum(mask, axis=1)`.

    Computed in two levels, within blocks of ~sqrt(T) tokens and then over the blocks' totals
    by an exact triangular product, because with the token axis sharded (`sequence` > 1) XLA
    lowers a cumulative sum on the GPU to a sequential loop over each shard's tokens: at 128K
    tokens ~130,000 tiny kernels a step (docs/benchmarks.md, context parallelism)."""
    b, t = mask.shape
    if t >= 1 << 24:
        raise ValueError(f"mask: {t} tokens a row; counts are exact in f32 below 2^24 only")
    block = 1 << max(0, (max(t, 1).bit_length() + 1) // 2)  # a power of two >= sqrt(T)
    n = -(-t // block)
    x = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, n * block - t))).reshape(b, n, block)
    within = jnp.cumsum(x, axis=2)
    # counts < 2^24: exact in f32 at HIGHEST precision (the default may round through TF32)
    before = jnp.triu(jnp.ones((n, n), jnp.float32), k=1)
    offsets = jnp.dot(within[:, :, -1].astype(jnp.float32), before,
                      precision=jax.lax.Precision.HIGHEST)
    out = within + jnp.round(offsets).astype(jnp.int32)[:, :, None]
    return out.reshape(b, n * block)[:, :t]


def scatter_row_features(embeds: Array, mask: Array, features: Array) -> Array:
    """Writes each row's features `features: [B, M, H]` into `embeds: [B, T, H]` at the True
    positions of `mask: [B, T]`, in order: row `b`'s k-th placeholder gets `features[b, k]`."""
    idx = jnp.clip(count_along_tokens(mask) - 1, 0, features.shape[1] - 1)
    feats = jnp.take_along_axis(features, idx[..., None], axis=1)
    return jnp.where(mask[..., None], feats.astype(embeds.dtype), embeds)


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL with optional hybrid NSA layers. Parameter names mirror transformers'."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.visual = VisionTower(
            cfg.vision, dtype=dtype, rngs=rngs, remat=cfg.vision_remat if cfg.remat else None,
            scan=cfg.scan_layers,
        )
        self.language = LanguageModel(cfg, dtype=dtype, rngs=rngs)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = linear(
                cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype, rngs=rngs
            )

    # ------------------------------------------------------------------ array function

    def forward(
        self,
        input_ids: Array,
        position_ids: Array,
        segment_ids: Array | None = None,
        images: VisualBatch | None = None,
        videos: VisualBatch | VideoRows | None = None,
        *,
        text_rows: int | None = None,
        return_hidden: bool = False,
        sequence_parallel: SequenceParallel | None = None,
    ) -> Array:
        """Logits `[B, T, vocab]` f32, or with `return_hidden` the final (normed) hidden states
        `[B, T, hidden]` in the model's dtype (for a loss computed in chunks).

        Args:
          input_ids: `[B, T]`.
          position_ids: `[B, 3, T]` mRoPE positions (the data pipeline's layout), restarting
            at each packed sample.
          segment_ids: `[B, T]`, 1, 2, ... per packed sample, 0 = padding; None = one sample
            per row and no padding (the fused kernels' fastest case).
          images, videos: the visual batches (`prepare` builds them), or the videos laid
            out per row (`VideoRows`, the training step's static layout).
          text_rows: static slots for the text rows of the hybrid layers
            (`prepare` buckets them; None = T).
          sequence_parallel: the mesh whose `sequence` axis shards the tokens (context
            parallelism, `attention/sequence_parallel.py`); None: unsharded.
        Pure in its arrays: jit it with `text_rows` and `return_hidden` static.
        """
        cfg = self.cfg
        x = self.language.embed_tokens(input_ids)
        if images is not None:
            feats = self.visual(images.pixels, images.inputs)
            x = scatter_features(x, input_ids == cfg.image_token_id, feats)
        if isinstance(videos, VideoRows):
            sp = sequence_parallel
            if sp is None:
                feats = jax.vmap(self.visual)(videos.pixels, videos.inputs)
            else:  # each row's patches over `sequence`, the rows over the batch axes
                feats = jax.vmap(functools.partial(self.visual, sequence_parallel=sp),
                                 spmd_axis_name=sp.batch_spec(input_ids.shape[0]))(
                    videos.pixels, videos.inputs)
            x = scatter_row_features(x, input_ids == cfg.video_token_id, feats)
        elif videos is not None:
            feats = self.visual(videos.pixels, videos.inputs)
            x = scatter_features(x, input_ids == cfg.video_token_id, feats)
        li = self.language.layer_inputs(
            position_ids, segment_ids, input_ids == cfg.video_token_id, text_rows,
            sequence_parallel,
        )
        if sequence_parallel is not None:  # the layers' activations: tokens on `sequence`
            x = sequence_parallel.shard_tokens(x)
        h = self.language(x, li)
        return h if return_hidden else self.logits(h)

    def logits(self, h: Array) -> Array:
        """The LM head: final (normed) hidden states `[..., H]` -> f32 logits `[..., vocab]`."""
        if self.cfg.text.tie_word_embeddings:
            return self.language.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def output_kernel(self) -> Array:
        """The LM head as a `[H, vocab]` matrix (the embedding's transpose when tied): logits
        are `forward(..., return_hidden=True) @ output_kernel()`."""
        if self.cfg.text.tie_word_embeddings:
            return self.language.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    # ------------------------------------------------------------------ transformers-style call

    def __call__(
        self,
        input_ids: Any,
        *,
        attention_mask: Any = None,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
        second_per_grid_ts: Any = None,
        mm_token_type_ids: Any = None,
        segment_ids: Any = None,
        position_ids: Any = None,
        return_hidden: bool = False,
    ) -> Array:
        """Logits `[B, T, vocab]` f32 (or, with `return_hidden`, hidden states
        `[B, T, hidden]`) from NumPy or JAX arrays laid out as transformers' Qwen2.5-VL forward
        takes them, so `model(**processor_output)` works; the data pipeline's layout works
        too (see `prepare`).

        Args:
          input_ids: `[B, T]` token ids, one `<|image_pad|>` / `<|video_pad|>` per merged patch.
          attention_mask: `[B, T]`, 0 at padding. With NSA layers, pad on the right (or pack):
            NSA places its blocks by absolute position, so a left-padded prompt's video rows
            differ from the same prompt alone. Left padding is exact only with NSA off.
          pixel_values, image_grid_thw: all images' patches `[N, 3*2*14*14]` and grids `[I, 3]`.
          pixel_values_videos, video_grid_thw: the same for videos (`[V, 3]` grids), or per
            row `[B, P, 3*2*14*14]` and `[B, V, 3]`.
          second_per_grid_ts: `[V]` (or `[B, V]`) seconds per temporal patch of each video.
          mm_token_type_ids: `[B, T]` modality per token; checked against `input_ids`.
          segment_ids: `[B, T]` packed samples 1, 2, ... (0 = padding); they never attend
            across and each keeps its own positions.
          position_ids: `[B, 3, T]` mRoPE positions, if already computed.
          return_hidden: return the final hidden states instead of the logits.
        """
        prepared = prepare(
            self.cfg,
            input_ids,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            mm_token_type_ids=mm_token_type_ids,
        )
        return jit_forward(self, **prepared, return_hidden=return_hidden)


@functools.partial(nnx.jit, static_argnames=("text_rows", "return_hidden"))
def jit_forward(model: Qwen25VL, **kw: Any) -> Array:
    """`model.forward` compiled (`text_rows` and `return_hidden` static)."""
    return model.forward(**kw)


def init_model(cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> Qwen25VL:
    """A randomly initialised model (gates as VideoNSA: N(0, 0.02) weights, zero biases)."""
    return Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
