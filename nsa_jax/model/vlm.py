"""The whole Qwen2.5-VL / VideoNSA model: vision features scattered at the placeholder tokens,
the language model, the LM head.

`Qwen25VL.__call__` takes exactly what transformers' `Qwen2_5_VLForConditionalGeneration`
forward takes (NumPy or JAX arrays), so a processor output feeds it: it computes the
grid-dependent index arrays on the host (rope index, window partition) and runs the
jit-compiled array function `forward`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.config import ModelConfig
from nsa_jax.model import rope
from nsa_jax.model.language import LanguageModel
from nsa_jax.model.layers import linear
from nsa_jax.model.vision import VisionInputs, VisionTower

Array = jax.Array

jax.tree_util.register_dataclass(
    VisionInputs,
    data_fields=["perm", "inverse", "window_seg", "frame_seg", "pos_hw"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class VisualBatch:
    """Pixels of all images (or all videos) of a batch and their host-side index arrays."""

    pixels: Array
    inputs: VisionInputs


jax.tree_util.register_dataclass(VisualBatch, data_fields=["pixels", "inputs"], meta_fields=[])


def scatter_features(embeds: Array, mask: Array, features: Array) -> Array:
    """Writes `features: [M, H]` into `embeds: [B, T, H]` at the `M` True positions of
    `mask: [B, T]`, in row-major order (transformers' `masked_scatter`)."""
    flat = mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1)
    out = jnp.where(
        flat[:, None], features[idx].astype(embeds.dtype), embeds.reshape(flat.size, -1)
    )
    return out.reshape(embeds.shape)


@dataclasses.dataclass(frozen=True)
class VideoRows:
    """The videos of a batch laid out per row with static shapes (the training pipeline's
    layout): `pixels: [B, P, patch_dim]`, each `inputs` field with a leading `[B]` axis over
    `P` patch rows. A row's real patches come first; its padding patches sit in segments of
    their own, and their merged features follow the row's real ones."""

    pixels: Array
    inputs: VisionInputs


jax.tree_util.register_dataclass(VideoRows, data_fields=["pixels", "inputs"], meta_fields=[])


def scatter_row_features(embeds: Array, mask: Array, features: Array) -> Array:
    """Writes each row's features `features: [B, M, H]` into `embeds: [B, T, H]` at the True
    positions of `mask: [B, T]`, in order: row `b`'s k-th placeholder gets `features[b, k]`."""
    idx = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, features.shape[1] - 1)
    feats = jnp.take_along_axis(features, idx[..., None], axis=1)
    return jnp.where(mask[..., None], feats.astype(embeds.dtype), embeds)


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL with optional hybrid NSA layers. Parameter names mirror transformers'."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
        self.language = LanguageModel(cfg, dtype=dtype, rngs=rngs)
        if not cfg.text.tie_word_embeddings:
            self.lm_head = linear(
                cfg.text.hidden_size, cfg.text.vocab_size, bias=False, dtype=dtype, rngs=rngs
            )

    # ------------------------------------------------------------------ array function

    def forward(
        self,
        input_ids: Array,
        attention_mask: Array,
        position_ids: Array,
        images: VisualBatch | None = None,
        videos: VisualBatch | None = None,
    ) -> Array:
        """Logits `[B, T, vocab]` f32 from `input_ids, attention_mask: [B, T]`,
        `position_ids: [3, B, T]` and the visual batches. Pure in its arrays: jit it."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, images, videos)
        if self.cfg.text.tie_word_embeddings:
            logits = self.language.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def hidden_states(
        self,
        input_ids: Array,
        attention_mask: Array,
        position_ids: Array,
        images: VisualBatch | None = None,
        videos: VisualBatch | VideoRows | None = None,
    ) -> Array:
        """Final hidden states `[B, T, H]` (after the last norm, before the LM head), in the
        model's dtype; arguments as `forward`, or `videos` laid out per row (`VideoRows`)."""
        cfg = self.cfg
        x = self.language.embed_tokens(input_ids)
        if images is not None:
            feats = self.visual(images.pixels, images.inputs)
            x = scatter_features(x, input_ids == cfg.image_token_id, feats)
        if isinstance(videos, VideoRows):
            feats = jax.vmap(self.visual)(videos.pixels, videos.inputs)
            x = scatter_row_features(x, input_ids == cfg.video_token_id, feats)
        elif videos is not None:
            feats = self.visual(videos.pixels, videos.inputs)
            x = scatter_features(x, input_ids == cfg.video_token_id, feats)
        li = self.language.layer_inputs(
            position_ids, attention_mask, input_ids == cfg.video_token_id
        )
        return self.language(x, li)

    def output_kernel(self) -> Array:
        """The LM head as a `[H, vocab]` matrix (the embedding's transpose when tied): logits
        are `hidden_states @ output_kernel()`."""
        if self.cfg.text.tie_word_embeddings:
            return self.language.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    # ------------------------------------------------------------------ transformers-style call

    def prepare(
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
    ) -> dict[str, Any]:
        """Host-side preparation: the arguments of `forward` from transformers-style inputs.

        `mm_token_type_ids` (0 text, 1 image, 2 video; transformers 5's processor returns it)
        carries nothing `input_ids` does not: the placeholder ids decide, and a disagreement on
        a real (unmasked) token is an error rather than a silent choice between the two.
        """
        cfg = self.cfg
        ids = np.asarray(input_ids).astype(np.int32)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mm_token_type_ids is not None:
            given = np.asarray(mm_token_type_ids)
            want = rope.token_types(ids, cfg.image_token_id, cfg.video_token_id)
            if given.shape != ids.shape:
                raise ValueError(
                    f"mm_token_type_ids has shape {given.shape}, input_ids {ids.shape}"
                )
            bad = (given != want) & mask.astype(bool)
            if bad.any():
                b, t = (int(i[0]) for i in np.nonzero(bad))
                raise ValueError(
                    f"mm_token_type_ids disagrees with input_ids at [{b}, {t}]: type "
                    f"{int(given[b, t])} for token {int(ids[b, t])} (expected {int(want[b, t])})"
                )
        grids = {
            k: None if g is None else np.asarray(g).reshape(-1, 3).astype(np.int64)
            for k, g in (("image", image_grid_thw), ("video", video_grid_thw))
        }
        pos, _ = rope.get_rope_index(
            ids,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
            tokens_per_second=cfg.vision.tokens_per_second,
            image_grid_thw=grids["image"],
            video_grid_thw=grids["video"],
            second_per_grid_ts=None
            if second_per_grid_ts is None
            else np.asarray(second_per_grid_ts),
            attention_mask=None if attention_mask is None else mask,
            style=cfg.rope_index_style,
        )

        def visual(
            pixels: Any, grid: np.ndarray | None, token: int, name: str
        ) -> VisualBatch | None:
            if pixels is None:
                return None
            if grid is None:
                raise ValueError(f"{name} pixels given without their grid_thw")
            n_tokens = int((ids == token).sum())
            n_feats = int(grid.prod(-1).sum()) // cfg.vision.spatial_merge_size**2
            if n_tokens != n_feats:
                raise ValueError(
                    f"{name} features and {name} tokens do not match: tokens {n_tokens}, "
                    f"features {n_feats}"
                )
            vi = VisionInputs.from_grid(grid, cfg.vision)
            return VisualBatch(jnp.asarray(np.asarray(pixels)), jax.tree.map(jnp.asarray, vi))

        return dict(
            input_ids=jnp.asarray(ids),
            attention_mask=jnp.asarray(mask.astype(np.int32)),
            position_ids=jnp.asarray(pos.astype(np.int32)),
            images=visual(pixel_values, grids["image"], cfg.image_token_id, "image"),
            videos=visual(pixel_values_videos, grids["video"], cfg.video_token_id, "video"),
        )

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
    ) -> Array:
        """Logits `[B, T, vocab]` f32 from NumPy or JAX arrays laid out as transformers'
        Qwen2.5-VL forward takes them, so `model(**processor_output)` works.

        Args:
          input_ids: `[B, T]` token ids, one `<|image_pad|>` / `<|video_pad|>` per merged patch.
          attention_mask: `[B, T]`, 0 at padding. With NSA layers, pad on the right (or pack):
            NSA places its blocks by absolute position, so a left-padded prompt's video rows
            differ from the same prompt alone. Left padding is exact only with NSA off.
          pixel_values, image_grid_thw: all images' patches `[N, 3*2*14*14]` and grids `[I, 3]`.
          pixel_values_videos, video_grid_thw: the same for videos (`[V, 3]` grids).
          second_per_grid_ts: `[V]` seconds per temporal patch of each video.
          mm_token_type_ids: `[B, T]` modality per token; checked against `input_ids`.
        """
        prepared = self.prepare(
            input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            mm_token_type_ids=mm_token_type_ids,
        )
        return _jit_forward(self, **prepared)


@nnx.jit
def _jit_forward(model: Qwen25VL, **kw: Any) -> Array:
    return model.forward(**kw)


def init_model(cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, seed: int = 0) -> Qwen25VL:
    """A randomly initialised model (gates as VideoNSA: N(0, 0.02) weights, zero biases)."""
    return Qwen25VL(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
