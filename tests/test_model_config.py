"""Model configs: Hugging Face `config.json` in both layouts, out again, and the presets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nsa_jax.config import PRESETS, QWEN_ARCH, VIDEONSA_ARCH, ModelConfig, preset
from nsa_jax.convert import names

from hf_fixtures import TINY, tiny_hf_config


def official_config(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tied: bool,
    arch: str = QWEN_ARCH,
) -> dict[str, Any]:
    """A `config.json` in the flat layout of the official Qwen2.5-VL checkpoints."""
    return {
        "architectures": [arch],
        "model_type": "qwen2_5_vl",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "max_position_embeddings": 128000,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab,
    }


SIZES_7B = dict(
    hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, vocab=152064, tied=False
)
SIZES_3B = dict(
    hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2, vocab=151936, tied=True
)


@pytest.mark.parametrize("name,sizes", [("qwen2.5-vl-7b", SIZES_7B), ("qwen2.5-vl-3b", SIZES_3B)])
def test_official_flat_config_reads_as_the_preset(name, sizes):
    cfg = ModelConfig.from_hf(official_config(**sizes))
    assert cfg == preset(name)  # the whole config, rope index style included
    assert cfg.video_token_id == 151656
    assert cfg.nsa is None and cfg.architecture == QWEN_ARCH


@pytest.mark.parametrize(
    "name,style",
    [
        ("qwen2.5-vl-3b", "transformers"),  # what transformers runs for the official checkpoints
        ("qwen2.5-vl-7b", "transformers"),
        ("videonsa-7b", "qwen"),  # what VideoNSA's code (on transformers 4.x) ran
        ("videonsa-7b-clean", "qwen"),
    ],
)
def test_preset_rope_index_style(name, style):
    assert preset(name).rope_index_style == style


def test_released_videonsa_config_reads_as_the_videonsa_7b_preset():
    # the released checkpoint declares its architecture and no NSA settings
    cfg = ModelConfig.from_hf(official_config(**SIZES_7B, arch=VIDEONSA_ARCH))
    assert cfg == preset("videonsa-7b")
    assert cfg.nsa.videonsa_compat


def test_text_config_layout_reads_like_the_flat_layout():
    from transformers import Qwen2_5_VLConfig

    newer = Qwen2_5_VLConfig(**tiny_hf_config(TINY)).to_dict()  # what save_pretrained writes
    assert "text_config" in newer and "hidden_size" not in newer
    assert ModelConfig.from_hf(newer) == TINY
    assert ModelConfig.from_hf(TINY.to_hf()) == TINY  # flat


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_config_json(name):
    cfg = preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.to_hf()["architectures"] == [cfg.architecture]


def test_videonsa_presets_have_the_released_sizes_and_nsa_setting():
    released, clean = preset("videonsa-7b"), preset("videonsa-7b-clean")
    assert (released.text, released.vision) == (clean.text, clean.vision)
    t = released.text
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        3584,
        28,
        4,
        128,
    )
    for cfg, compat in ((released, True), (clean, False)):
        nsa = cfg.nsa
        assert (nsa.block_size, nsa.num_selected, nsa.window, nsa.gate_temperature) == (
            64,
            32,
            256,
            0.3,
        )
        assert (nsa.compression, nsa.videonsa_compat) == ("mean", compat)
        assert cfg.attention.layers is None  # every layer hybrid


def test_videonsa_7b_parameters_are_qwen_7b_plus_the_gates_in_hf_shapes():
    shapes = names.our_param_shapes(preset("videonsa-7b"))
    gates = {}
    for path, (shape, _) in shapes.items():
        if "g_proj" in path:
            key, kind = names.hf_name(path)
            gates[key] = names.hf_shape(shape, kind, preset("videonsa-7b"))
    assert len(gates) == 28 * 4
    assert gates["model.layers.27.self_attn.g_proj_1.weight"] == (3584, 3584)
    assert gates["model.layers.27.self_attn.g_proj_1.bias"] == (3584,)
    assert gates["model.layers.27.self_attn.g_proj_2.weight"] == (84, 3584)
    assert gates["model.layers.27.self_attn.g_proj_2.bias"] == (84,)
    # Qwen2.5-VL-7B-Instruct's safetensors index: total_size 16,584,333,312 bytes of bf16
    qwen = sum(int(np.prod(s)) for p, (s, _) in shapes.items() if "g_proj" not in p)
    assert qwen == 16_584_333_312 // 2
