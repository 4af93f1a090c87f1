"""The whole Qwen2.5-VL / VideoNSA model: vision features scattered at the placeholder tokens,
the language model, the LM head.

`Qwen25VL.__call__` takes exactly what transformers' `Qwen2_5_VLForConditionalGeneration`
forward takes (NumPy or JAX arrays), so a processor output feeds it, and the data pipeline's
batches too (`segment_ids` for packed samples, per-row pixels): `prepare` computes the
grid-dependent index arrays on the host (rope index, window partition, the text-row bucket)
and the jit-compiled array function `forward` returns logits or final hidden states.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.attention.compat import check_unpacked, compat_vision_mask
from nsa_jax.attention.hybrid import count_text_rows, text_row_bucket
from nsa_jax.attention.sequence_parallel import SequenceParallel
from nsa_jax.config import ModelConfig
from nsa_jax.model import rope
from nsa_jax.model.language import LanguageModel
from nsa_jax.model.layers import linear
from nsa_jax.model.vision import VisionInputs, VisionTower

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VisualBatch:
    """Pixels of all images (or all videos) of a batch and their host-side index arrays."""

    pixels: Array
    inputs: VisionInputs


jax.tree_util.register_dataclass(VisualBatch, data_fields=["pixels", "inputs"], meta_fields=[])


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

    # ------------------------------------------------------------------ host-side preparation

    def prepare(
        self,
        input_ids: Any,
        *,
        attention_mask: Any = None,
        segment_ids: Any = None,
        position_ids: Any = None,
        pixel_values: Any = None,
        image_grid_thw: Any = None,
        pixel_values_videos: Any = None,
        video_grid_thw: Any = None,
        second_per_grid_ts: Any = None,
        mm_token_type_ids: Any = None,
    ) -> dict[str, Any]:
        """Host-side preparation: the arguments of `forward` from transformers-style inputs or
        from a batch of the data pipeline (`nsa_jax.data`), whichever layout comes:

        - `segment_ids [B, T]` (packed samples, 0 = padding) wins over `attention_mask`
          (`[B, T]`, 0 = padding, one sample per row); both absent, or a mask of ones, means
          one sample per row without padding (`segment_ids=None` for `forward`);
        - `position_ids` `[B, 3, T]` are used as given, else computed (per packed sample);
        - pixels `[N, D]` with grids `[V, 3]` (transformers), or per row `[B, P, D]` with
          grids `[B, V, 3]` whose all-zero rows are absent videos (the pipeline's collate).

        `mm_token_type_ids` (0 text, 1 image, 2 video; transformers 5's processor returns it)
        carries nothing `input_ids` does not: the placeholder ids decide, and a disagreement on
        a real (unmasked) token is an error rather than a silent choice between the two.
        """
        cfg = self.cfg
        ids = np.asarray(input_ids).astype(np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
        if segment_ids is not None:
            seg = np.asarray(segment_ids).astype(np.int32)
            if seg.shape != ids.shape:
                raise ValueError(f"segment_ids has shape {seg.shape}, input_ids {ids.shape}")
        elif attention_mask is not None:
            seg = (np.asarray(attention_mask) > 0).astype(np.int32)
        else:
            seg = np.ones_like(ids)
        live = seg > 0
        if mm_token_type_ids is not None:
            given = np.asarray(mm_token_type_ids)
            want = rope.token_types(ids, cfg.image_token_id, cfg.video_token_id)
            if given.shape != ids.shape:
                raise ValueError(
                    f"mm_token_type_ids has shape {given.shape}, input_ids {ids.shape}"
                )
            bad = (given != want) & live
            if bad.any():
                b, t = (int(i[0]) for i in np.nonzero(bad))
                raise ValueError(
                    f"mm_token_type_ids disagrees with input_ids at [{b}, {t}]: type "
                    f"{int(given[b, t])} for token {int(ids[b, t])} (expected {int(want[b, t])})"
                )
        pixels = {"image": pixel_values, "video": pixel_values_videos}
        grids = {"image": image_grid_thw, "video": video_grid_thw}
        seconds = second_per_grid_ts
        for name in ("image", "video"):
            pixels[name], grids[name], secs = flat_visual(pixels[name], grids[name], seconds)
            if name == "video":
                seconds = secs
        if position_ids is None:
            pos, _ = rope.get_rope_index(
                ids,
                image_token_id=cfg.image_token_id,
                video_token_id=cfg.video_token_id,
                spatial_merge_size=cfg.vision.spatial_merge_size,
                tokens_per_second=cfg.vision.tokens_per_second,
                image_grid_thw=grids["image"],
                video_grid_thw=grids["video"],
                second_per_grid_ts=seconds,
                attention_mask=None if attention_mask is None and segment_ids is None else live,
                segment_ids=segment_ids if segment_ids is None else seg,
                style=cfg.rope_index_style,
            )
            position_ids = np.moveaxis(pos, 0, 1)  # [B, 3, T]
        position_ids = np.asarray(position_ids).astype(np.int32)
        if position_ids.shape != (ids.shape[0], 3, ids.shape[1]):
            raise ValueError(f"position_ids must be [B, 3, T], got shape {position_ids.shape}")
        tokens = {"image": cfg.image_token_id, "video": cfg.video_token_id}

        def visual(name: str) -> VisualBatch | None:
            if pixels[name] is None:
                return None
            grid = grids[name]
            if grid is None:
                raise ValueError(f"{name} pixels given without their grid_thw")
            n_tokens = int((ids == tokens[name]).sum())
            n_feats = int(grid.prod(-1).sum()) // cfg.vision.spatial_merge_size**2
            if n_tokens != n_feats:
                raise ValueError(
                    f"{name} features and {name} tokens do not match: tokens {n_tokens}, "
                    f"features {n_feats}"
                )
            vi = VisionInputs.from_grid(grid, cfg.vision)
            return VisualBatch(jnp.asarray(np.asarray(pixels[name])), jax.tree.map(jnp.asarray, vi))

        one_sample = bool(live.all()) and (segment_ids is None or bool((seg == 1).all()))
        return dict(
            input_ids=jnp.asarray(ids),
            position_ids=jnp.asarray(position_ids),
            segment_ids=None if one_sample else jnp.asarray(seg),
            images=visual("image"),
            videos=visual("video"),
            text_rows=text_row_slots(cfg, ids, position_ids, seg),
        )

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`forward`'s arguments from a batch of the data pipeline (`nsa_jax.data`) as it
        comes: `model.forward(**model.prepare_batch(batch))`. Keys the model does not read
        (labels, per-sample positions, video segment ids) stay for the loss."""
        return self.prepare(
            batch["input_ids"],
            segment_ids=batch.get("segment_ids"),
            position_ids=batch.get("position_ids"),
            pixel_values_videos=batch.get("pixel_values_videos"),
            video_grid_thw=batch.get("video_grid_thw"),
            second_per_grid_ts=batch.get("second_per_grid_ts"),
        )

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
        prepared = self.prepare(
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


def text_row_slots(
    cfg: ModelConfig, input_ids: np.ndarray, position_ids: np.ndarray, segment_ids: np.ndarray
) -> int | None:
    """`forward`'s static `text_rows` for a batch (host NumPy `[B, T]` ids and segment ids,
    `[B, 3, T]` positions): the bucketed count of the rows the hybrid layers attend densely
    (text by token id; in the VideoNSA emulation, by position as its code does), or None
    without NSA. Refuses packing where the emulation cannot keep samples apart."""
    if cfg.nsa is None:
        return None
    live = segment_ids > 0
    if cfg.nsa.videonsa_compat:
        is_text = ~compat_vision_mask(np.moveaxis(position_ids, 1, 0)) & live
        check_unpacked(segment_ids, cfg.attention.lse_layout)
    else:
        is_text = (input_ids != cfg.video_token_id) & live
    return text_row_bucket(count_text_rows(is_text), input_ids.shape[1])


def flat_visual(
    pixels: Any, grid: Any, seconds: Any
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Pixels `[N, D]`, grids `[V, 3]` and seconds `[V]` from either layout: already flat, or
    per row (`[B, P, D]`, `[B, V, 3]` with all-zero rows for absent videos, `[B, V]`), whose
    real patches (the first `sum(prod(grid))` of each row) are concatenated in row order."""
    if grid is None:
        return (None if pixels is None else np.asarray(pixels)), None, seconds
    g = np.asarray(grid).astype(np.int64)
    secs = None if seconds is None else np.asarray(seconds, np.float32)
    if g.ndim == 2:
        return (None if pixels is None else np.asarray(pixels)), g, secs
    present = g.prod(-1) > 0  # [B, V]
    flat = None
    if pixels is not None:
        px = np.asarray(pixels)
        flat = np.concatenate([px[b, : int(g[b].prod(-1).sum())] for b in range(g.shape[0])])
    return flat, g[present], None if secs is None else secs[present]


@functools.partial(nnx.jit, static_argnames=("text_rows", "return_hidden"))
def jit_forward(model: Qwen25VL, **kw: Any) -> Array:
    """`model.forward` compiled (`text_rows` and `return_hidden` static)."""
    return model.forward(**kw)


def init_model(cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> Qwen25VL:
    """A randomly initialised model (gates as VideoNSA: N(0, 0.02) weights, zero biases)."""
    return Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
