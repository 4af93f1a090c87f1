"""Qwen2 decoder with multimodal RoPE and, per layer, hybrid dense/NSA attention.

Each layer: `x + o_proj(attn(rope(q), rope(k), v))` on `input_layernorm(x)`, then
`x + mlp(post_attention_layernorm(x))`. A layer with NSA (`ModelConfig.uses_nsa`) also holds
VideoNSA's gate MLP `g_proj_1 (H->H) -> GELU -> g_proj_2 (H->3*Hq)`, output head-major
(`head*3 + branch`), weights N(0, 0.02) and zero biases so every gate starts at 0.5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.attention.compat import compat_vision_mask
from nsa_jax.attention.dense import dense_attention
from nsa_jax.attention.hybrid import hybrid_attention
from nsa_jax.config import ModelConfig
from nsa_jax.model import rope
from nsa_jax.model.layers import GatedMLP, RMSNorm, activation, linear

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """Per-forward arrays every layer needs.

    cos, sin: `[B, T, head_dim]` f32 mRoPE tables; segment_ids: `[B, T]` (0 = padding);
    is_video: `[B, T]` bool, the queries routed to NSA (already the compat split when
    `videonsa_compat`).
    """

    cos: Array
    sin: Array
    segment_ids: Array
    is_video: Array


jax.tree_util.register_dataclass(
    LayerInputs, data_fields=["cos", "sin", "segment_ids", "is_video"], meta_fields=[]
)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        t = cfg.text
        hd = t.head_dim
        self.q_proj = linear(
            t.hidden_size, t.num_attention_heads * hd, bias=True, dtype=dtype, rngs=rngs
        )
        self.k_proj = linear(
            t.hidden_size, t.num_key_value_heads * hd, bias=True, dtype=dtype, rngs=rngs
        )
        self.v_proj = linear(
            t.hidden_size, t.num_key_value_heads * hd, bias=True, dtype=dtype, rngs=rngs
        )
        self.o_proj = linear(
            t.num_attention_heads * hd, t.hidden_size, bias=False, dtype=dtype, rngs=rngs
        )
        self.nsa = cfg.nsa if cfg.uses_nsa(layer) else None
        if self.nsa is not None:
            self.g_proj_1 = linear(t.hidden_size, t.hidden_size, bias=True, dtype=dtype, rngs=rngs)
            self.g_proj_2 = linear(
                t.hidden_size, 3 * t.num_attention_heads, bias=True, dtype=dtype, rngs=rngs
            )
        self.heads, self.kv_heads, self.head_dim = t.num_attention_heads, t.num_key_value_heads, hd
        self.implementation = cfg.nsa_implementation
        self.lse_layout = cfg.compat_lse_layout

    def __call__(self, x: Array, li: LayerInputs) -> Array:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
        q, k = rope.apply_rope(q, li.cos, li.sin), rope.apply_rope(k, li.cos, li.sin)
        if self.nsa is None:
            o = dense_attention(q, k, v, li.segment_ids)
        else:
            logits = self.g_proj_2(activation("gelu", self.g_proj_1(x)))
            o = hybrid_attention(
                q,
                k,
                v,
                logits.reshape(b, t, self.heads, 3),
                li.is_video,
                self.nsa,
                segment_ids=li.segment_ids,
                implementation=self.implementation,
                lse_layout=self.lse_layout,
            )
        return self.o_proj(o.reshape(b, t, -1))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        t = cfg.text
        self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(
            t.hidden_size, t.intermediate_size, t.hidden_act, bias=False, dtype=dtype, rngs=rngs
        )
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)

    def __call__(self, x: Array, li: LayerInputs) -> Array:
        x = x + self.self_attn(self.input_layernorm(x), li)
        return x + self.mlp(self.post_attention_layernorm(x))


def _run_layer(layer: DecoderLayer, x: Array, li: LayerInputs) -> Array:
    return layer(x, li)


_run_layer_remat = nnx.remat(_run_layer)


class LanguageModel(nnx.Module):
    """Embeddings, decoder layers and final norm (the LM head lives in `vlm.py`)."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        t = cfg.text
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            t.vocab_size,
            t.hidden_size,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(t.num_hidden_layers)]
        )
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)

    def layer_inputs(
        self, position_ids: Array, attention_mask: Array, video_mask: Array
    ) -> LayerInputs:
        """`position_ids: [3, B, T]`, `attention_mask: [B, T]`, `video_mask: [B, T]` (token ids
        equal to `<|video_pad|>`) -> what each layer reads."""
        t = self.cfg.text
        cos, sin = rope.mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        nsa = self.cfg.nsa
        is_video = compat_vision_mask(position_ids) if nsa and nsa.videonsa_compat else video_mask
        return LayerInputs(cos, sin, attention_mask.astype(jnp.int32), is_video)

    def __call__(self, x: Array, li: LayerInputs) -> Array:
        """`x: [B, T, H]` input embeddings -> final hidden states `[B, T, H]`."""
        run = _run_layer_remat if self.cfg.remat else _run_layer
        for layer in self.layers:
            x = run(layer, x, li)
        return self.norm(x)
