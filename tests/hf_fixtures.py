"""Random tiny Hugging Face Qwen2.5-VL checkpoints and inputs, for offline parity tests.

Test fixtures, not library code: needs `torch` and `transformers` (the `dev` extra); nothing is
downloaded. Imported by the tests as `from hf_fixtures import ...`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from nsa_jax.config import ModelConfig, preset

TINY = preset("tiny")


def tiny_hf_config(cfg: ModelConfig = TINY) -> dict[str, Any]:
    """The HF config dict of `cfg` in the newer `text_config` layout."""
    t, v = cfg.text, cfg.vision
    return dict(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
            bos_token_id=None,
            eos_token_id=None,
        ),
        vision_config=dict(
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            window_size=v.window_size,
            tokens_per_second=v.tokens_per_second,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
        ),
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def make_tiny_hf_checkpoint(
    out_dir: str, cfg: ModelConfig = TINY, *, seed: int = 0, nsa_gates: bool = False
) -> Any:
    """Saves a randomly initialised `Qwen2_5_VLForConditionalGeneration` to `out_dir` and
    returns the torch model (f32, eval mode). With `nsa_gates`, VideoNSA's gate tensors
    `model.layers.N.self_attn.g_proj_1/2.*` are added to the safetensors (N(0, 0.02) weights,
    zero biases) and config.json declares the VideoNSA architecture with an "nsa" key."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**tiny_hf_config(cfg)))
    model = model.float().eval()
    # RMSNorm weights start at one; perturb them so the parity tests see them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    if nsa_gates:
        path = os.path.join(out_dir, "model.safetensors")
        tensors = load_file(path)
        t = cfg.text
        g = torch.Generator().manual_seed(seed + 1)
        for i in range(t.num_hidden_layers):
            pre = f"model.layers.{i}.self_attn."
            tensors[pre + "g_proj_1.weight"] = 0.02 * torch.randn(
                t.hidden_size, t.hidden_size, generator=g
            )
            tensors[pre + "g_proj_1.bias"] = torch.zeros(t.hidden_size)
            tensors[pre + "g_proj_2.weight"] = 0.02 * torch.randn(
                3 * t.num_attention_heads, t.hidden_size, generator=g
            )
            tensors[pre + "g_proj_2.bias"] = torch.zeros(3 * t.num_attention_heads)
        save_file(tensors, path, metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json")) as f:
            d = json.load(f)
        d["architectures"] = ["VideoNSAForConditionalGeneration"]
        nsa_cfg = cfg.nsa or preset("videonsa-7b-clean").nsa
        d["nsa"] = cfg.with_attention(nsa=nsa_cfg).to_hf()["nsa"]
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(d, f, indent=2)
    return model


def vision_tokens(cfg: ModelConfig, grid: tuple[int, int, int], token: int) -> list[int]:
    """`<|vision_start|>`, one placeholder per merged patch, `<|vision_end|>`."""
    n = int(np.prod(grid)) // cfg.vision.spatial_merge_size**2
    return [cfg.vision_start_token_id, *[token] * n, cfg.vision_end_token_id]


def random_prompt(
    rng: np.random.Generator,
    cfg: ModelConfig = TINY,
    *,
    images: tuple[tuple[int, int, int], ...] = (),
    videos: tuple[tuple[int, int, int], ...] = (),
    text_len: int = 5,
) -> dict[str, np.ndarray]:
    """One prompt (batch 1): text, then each image, then each video, text between; with
    random pixels. Returns transformers-style arrays (no `mm_token_type_ids`)."""

    def text() -> list[int]:
        return rng.integers(0, cfg.vision_start_token_id - 5, text_len).tolist()

    ids = text()
    for g in images:
        ids += vision_tokens(cfg, g, cfg.image_token_id) + text()
    for g in videos:
        ids += vision_tokens(cfg, g, cfg.video_token_id) + text()
    out: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], np.int64)}
    dim = cfg.vision.patch_dim
    if images:
        out["image_grid_thw"] = np.asarray(images, np.int64)
        out["pixel_values"] = rng.standard_normal((int(np.prod(images, -1).sum()), dim)).astype(
            np.float32
        )
    if videos:
        out["video_grid_thw"] = np.asarray(videos, np.int64)
        out["pixel_values_videos"] = rng.standard_normal(
            (int(np.prod(videos, -1).sum()), dim)
        ).astype(np.float32)
    return out


def hf_logits(model: Any, inputs: dict[str, np.ndarray], cfg: ModelConfig = TINY) -> np.ndarray:
    """Runs the torch model on transformers-style inputs (adds `mm_token_type_ids`)."""
    import torch

    from nsa_jax.model.rope import token_types

    kw = {k: torch.as_tensor(v) for k, v in inputs.items()}
    kw["mm_token_type_ids"] = torch.as_tensor(
        token_types(inputs["input_ids"], cfg.image_token_id, cfg.video_token_id)
    )
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def newer_key(key: str) -> str:
    """An older-layout HF key (`model.layers.*`, `visual.*`) in the newer layout
    (`model.language_model.*`, `model.visual.*`); `lm_head.*` stays."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def make_published_videonsa(
    out_dir: str,
    *,
    architecture: str = "DonerightForConditionalGeneration",
    layout: str = "old",
    shards: int = 2,
    config_extra: dict[str, Any] | None = None,
    dtype: Any = None,
) -> dict[str, np.ndarray]:
    """A tiny checkpoint in the shape VideoNSA's training writes it: the Qwen2.5-VL tensors
    plus, per decoder layer, `self_attn.g_proj_1.weight [H, H]` and `.bias [H]`,
    `self_attn.g_proj_2.weight [3 * heads, H]` and `.bias [3 * heads]` (rows head-major:
    `head * 3 + branch`, branches compressed, selected, window), no "nsa" key in config.json
    (the released code hard-codes its setting) and `architecture` declared.

    Keys in `layout` ("old": `model.layers.*`, `visual.*`; "new": `model.language_model.*`,
    `model.visual.*`), in one `model.safetensors` (`shards=1`) or split vision / language over
    two shards with an index, as transformers names them; tensors in `dtype` (stored f32 when
    None), `config_extra` merged into config.json. Returns the tensors by key.
    """
    from safetensors.numpy import load_file, save_file

    make_tiny_hf_checkpoint(out_dir, nsa_gates=True)
    single = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(single)
    os.remove(single)
    if layout == "new":
        tensors = {newer_key(k): v for k, v in tensors.items()}
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, single, metadata={"format": "pt"})
    else:
        parts = [
            {k: v for k, v in tensors.items() if "visual." not in k},
            {k: v for k, v in tensors.items() if "visual." in k},
        ]
        wm = {}
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file(part, os.path.join(out_dir, name), metadata={"format": "pt"})
            wm.update(dict.fromkeys(part, name))
        total = sum(v.nbytes for v in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(
                {"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2, sort_keys=True
            )
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        d = json.load(f)
    del d["nsa"]
    d["architectures"] = [architecture]
    d.update(config_extra or {})
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    return tensors
