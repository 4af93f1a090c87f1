"""Qwen2 decoder with multimodal RoPE and, per layer, hybrid dense/NSA attention.

Each layer: `x + o_proj(attn(rope(q), rope(k), v))` on `input_layernorm(x)`, then
`x + mlp(post_attention_layernorm(x))`. A layer with NSA (`ModelConfig.uses_nsa`) also holds
VideoNSA's gate MLP `g_proj_1 (H->H) -> GELU -> g_proj_2 (H->3*Hq)`, output head-major
(`head*3 + branch`), weights N(0, 0.02) and zero biases so every gate starts at 0.5.

Attention by layer: a layer without NSA runs `dense_attention` (cuDNN / Pallas / chunked XLA
by backend); a hybrid layer routes its rows (`attention/hybrid.py`). Remat per layer follows
`ModelConfig.remat_policy`, named as MaxText names its policies (`REMAT_POLICIES`); with
`ModelConfig.scan_layers` each run of alike layers (hybrid or dense) is stored as one module
with stacked `[layers, ...]` parameters (`model/stacking.py`) and run as one `lax.scan` over
them (`layers.scan_stacked`), so compile time does not grow with depth; the layer
tags its matmul outputs with `checkpoint_name` (query_proj, key_proj, value_proj, context,
out_proj, mlpwi, mlpwo) for the policies that save some of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nsa_jax.attention.compat import compat_vision_mask
from nsa_jax.attention.dense import dense_attention
from nsa_jax.attention.hybrid import hybrid_attention
from nsa_jax.attention.sequence_parallel import SequenceParallel, sequence_parallel_attention
from nsa_jax.config import ModelConfig
from nsa_jax.model import rope, scopes
from nsa_jax.model.layers import (
    GatedMLP,
    RMSNorm,
    activation,
    linear,
    scan_stacked,
    stack_modules,
)
from nsa_jax.model.stacking import layer_runs, run_key

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """Per-forward arrays every layer needs.

    cos, sin: `[B, T, head_dim]` f32 mRoPE tables; segment_ids: `[B, T]` (0 = padding) or
    None (one sample per row, no padding: the fused kernels' fastest case); is_video:
    `[B, T]` bool, the queries routed to NSA (already the compat split when
    `videonsa_compat`); text_rows: static slots for the text rows of a hybrid layer (None:
    T; see `attention.hybrid.text_row_bucket`); sequence_parallel: the mesh whose `sequence`
    axis shards the tokens (None: unsharded; `attention/sequence_parallel.py`).
    """

    cos: Array
    sin: Array
    segment_ids: Array | None
    is_video: Array
    text_rows: int | None = None
    sequence_parallel: SequenceParallel | None = None


jax.tree_util.register_dataclass(
    LayerInputs, data_fields=["cos", "sin", "segment_ids", "is_video"],
    meta_fields=["text_rows", "sequence_parallel"],
)

# MaxText's remat policy names -> what each saves for the backward pass
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dot_with_context_except_mlp": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "context", "out_proj"
    ),
    "save_dot_except_mlpwi": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj", "mlpwo"
    ),
    "save_dot_except_mlp": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj"
    ),
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"
    ),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj"),
    # saved in host memory instead of the device's (pinned host), fetched back for the backward
    "minimal_offloaded": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
        offload_src="device", offload_dst="pinned_host"
    ),
    "qkv_proj_offloaded": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=["query_proj", "key_proj", "value_proj"],
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "none": jax.checkpoint_policies.everything_saveable,
}


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
        # the layer's attention settings, whole; None: a dense layer
        self.attention = cfg.attention if cfg.uses_nsa(layer) else None
        if self.attention is not None:
            self.g_proj_1 = linear(t.hidden_size, t.hidden_size, bias=True, dtype=dtype, rngs=rngs)
            self.g_proj_2 = linear(
                t.hidden_size, 3 * t.num_attention_heads, bias=True, dtype=dtype, rngs=rngs
            )
        self.heads, self.kv_heads, self.head_dim = t.num_attention_heads, t.num_key_value_heads, hd

    def project(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array, Array | None]:
        """`x: [B, T, H]` (normed) and its mRoPE tables `cos, sin: [B, T, D]` -> `q: [B, T, Hq,
        D]`, `k, v: [B, T, Hkv, D]` (RoPE on q and k) and, with NSA, the gate logits `[B, T, Hq,
        3]` (else None). Per token: callable on any run of tokens (the long prefill's chunks)."""
        b, t, _ = x.shape
        q = checkpoint_name(self.q_proj(x), "query_proj").reshape(b, t, self.heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x), "key_proj").reshape(b, t, self.kv_heads, self.head_dim)
        v = checkpoint_name(self.v_proj(x), "value_proj").reshape(
            b, t, self.kv_heads, self.head_dim
        )
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        if self.attention is None:
            return q, k, v, None
        logits = self.g_proj_2(activation("gelu", self.g_proj_1(x))).reshape(b, t, self.heads, 3)
        return q, k, v, logits

    def attend(self, q: Array, k: Array, v: Array, logits: Array | None,
               li: LayerInputs) -> Array:
        """The layer's attention over the whole sequence: `project`'s outputs -> `[B, T, Hq, D]`."""
        sp = li.sequence_parallel
        if self.attention is None:
            if sp is None:
                return dense_attention(q, k, v, li.segment_ids)
            return sequence_parallel_attention(dense_attention, sp, q, k, v,
                                               token_arrays=(li.segment_ids,))
        attn, rows = self.attention, li.text_rows

        def attend(q: Array, k: Array, v: Array, logits: Array, is_video: Array,
                   seg: Array | None) -> Array:
            return hybrid_attention(q, k, v, logits, is_video, attn, segment_ids=seg,
                                    text_rows=rows)

        if sp is None:
            return attend(q, k, v, logits, li.is_video, li.segment_ids)
        return sequence_parallel_attention(
            attend, sp, q, k, v, (logits,), (li.is_video, li.segment_ids)
        )

    def __call__(self, x: Array, li: LayerInputs) -> Array:
        b, t, _ = x.shape
        q, k, v, logits = self.project(x, li.cos, li.sin)
        with jax.named_scope(scopes.ATTENTION):
            o = self.attend(q, k, v, logits, li)
        o = checkpoint_name(o.reshape(b, t, -1), "context")
        return checkpoint_name(self.o_proj(o), "out_proj")


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


def run_layer(layer: DecoderLayer, x: Array, li: LayerInputs) -> Array:
    return layer(x, li)


class LanguageModel(nnx.Module):
    """Embeddings, decoder layers and final norm (the LM head lives in `vlm.py`).

    `layers`: one `DecoderLayer` per layer (`nnx.List`), or with `scan_layers` one per run of
    alike layers whose parameters are stacked `[layers, ...]`, keyed by the run (`nnx.Dict`,
    `"0:28"`; `model/stacking.py`). Initial values are the same in both layouts."""

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
        layers = [DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(t.num_hidden_layers)]
        if cfg.scan_layers:
            self.layers = nnx.Dict({run_key(run): stack_modules([layers[i] for i in run])
                                    for run in layer_runs(cfg)})
        else:
            self.layers = nnx.List(layers)
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype)

    def layer_states(self) -> Iterator[tuple[nnx.GraphDef, nnx.State]]:
        """Each decoder layer in order as `(graphdef, state)`, in either layout: a stacked
        run's layers are sliced out of it one at a time (`nsa_jax.prefill` runs them so)."""
        if not self.cfg.scan_layers:
            for layer in self.layers:
                yield nnx.split(layer)
            return
        for run in layer_runs(self.cfg):
            graphdef, stacked = nnx.split(self.layers[run_key(run)])
            for i in range(len(run)):
                yield graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)

    def layer_inputs(
        self,
        position_ids: Array,
        segment_ids: Array | None,
        video_mask: Array,
        text_rows: int | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ) -> LayerInputs:
        """`position_ids: [B, 3, T]`, `segment_ids: [B, T]` (0 = padding) or None,
        `video_mask: [B, T]` (token ids equal to `<|video_pad|>`), `text_rows` and
        `sequence_parallel` (static) -> what each layer reads."""
        t = self.cfg.text
        pos = jnp.moveaxis(position_ids, 1, 0)  # [3, B, T]
        cos, sin = rope.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
        nsa = self.cfg.nsa
        is_video = compat_vision_mask(pos) if nsa and nsa.videonsa_compat else video_mask
        if sequence_parallel is not None:
            sequence_parallel.check(t.num_attention_heads, t.num_key_value_heads,
                                    position_ids.shape[-1])
        # segment ids as given: each attention path reads them through `as_segments` (int32)
        return LayerInputs(cos, sin, segment_ids, is_video, text_rows, sequence_parallel)

    @jax.named_scope(scopes.LANGUAGE)  # its ops by part in a step profile (train/profile.py)
    def __call__(self, x: Array, li: LayerInputs) -> Array:
        """`x: [B, T, H]` input embeddings -> final hidden states `[B, T, H]`."""
        cfg = self.cfg
        policy = REMAT_POLICIES[cfg.remat_policy] if cfg.remat else None
        if cfg.scan_layers:
            for run in layer_runs(cfg):
                graphdef, stacked = nnx.split(self.layers[run_key(run)])
                x = scan_stacked(graphdef, stacked, x, lambda layer, h: layer(h, li), policy)
            return self.norm(x)
        step = run_layer if policy is None else nnx.remat(run_layer, policy=policy)
        for layer in self.layers:
            x = step(layer, x, li)
        return self.norm(x)
