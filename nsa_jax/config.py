"""Model configuration: vision tower, language model, NSA settings; HF `config.json` in and out.

`ModelConfig.from_hf` reads both layouts Hugging Face has used for Qwen2.5-VL:
- the older flat one (language-model fields at the top level, `rope_scaling` with
  `mrope_section`, `rope_theta` at the top level), as in the official checkpoints;
- the newer one with a nested `text_config` (and `rope_parameters`), written by transformers 5.
NSA settings live under their own key, `"nsa"`, which transformers ignores (with the
`AttentionConfig` fields `nsa_layers` and `compat_lse_layout` beside them, by those names).
`to_hf` writes the flat layout of the official checkpoints plus the `"nsa"` key when NSA is on,
and our
`"rope_index_style"` at the top level (a Qwen2.5-VL setting, so kept also without NSA: a
checkpoint we write reads back as the same config). An `"nsa"` key may also hold
`rope_index_style` (configs written before it moved); the top-level key wins.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, Literal

from nsa_jax.attention import AttentionConfig, NSAConfig

QWEN_ARCH = "Qwen2_5_VLForConditionalGeneration"
VIDEONSA_ARCH = "VideoNSAForConditionalGeneration"
# the class VideoNSA's training script (ms-swift `--model_type doneright`) registers and saves
DONERIGHT_ARCH = "DonerightForConditionalGeneration"
NSA_ARCHITECTURES = (VIDEONSA_ARCH, DONERIGHT_ARCH)
KNOWN_ARCHITECTURES = (QWEN_ARCH, *NSA_ARCHITECTURES)
# VideoNSA's code reads these config.json keys when present (its evaluation copy,
# `Qwen2_5_VLMixNSA`), each one field of our NSA config
RELEASED_NSA_KEYS = {"block_counts": "num_selected", "window_size": "window"}

RopeIndexStyle = Literal["transformers", "qwen"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen2.5-VL vision tower (a ViT with window attention and a 2x2 patch merger)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in `pixel_values`: C * T_patch * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder with multimodal RoPE."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


REMAT_POLICY_NAMES = (
    "full",
    "minimal",
    "save_dot_with_context_except_mlp",
    "save_dot_except_mlpwi",
    "save_dot_except_mlp",
    "save_qkv_proj",
    "save_out_proj",
    "minimal_offloaded",
    "qkv_proj_offloaded",
    "none",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole model.

    Attributes:
      attention: the attention settings, whole (`nsa_jax.attention.AttentionConfig`: NSA
        config, which layers, implementation, compat layout, kernel tile sizes); `nsa` is
        its NSA config, None for plain Qwen2.5-VL (dense attention everywhere).
      rope_index_style: where text after an image/video starts its positions:
        "transformers" (transformers 5, installed: start + max(h, w) / merge) or "qwen"
        (the original Qwen2.5-VL code, transformers 4.x: 1 + the largest position of the
        vision block, the temporal axis included). They agree for images and differ for a
        video whose temporal positions reach past its merged height and width.
      remat: rematerialise each decoder layer in the backward pass (`nnx.remat`).
      remat_policy: what a rematerialised layer saves, by MaxText's names (full: nothing,
        minimal, save_dot_with_context_except_mlp, save_dot_except_mlpwi,
        save_dot_except_mlp, save_qkv_proj, save_out_proj, none: everything; minimal_offloaded
        and qkv_proj_offloaded keep what they save in host memory);
        `nsa_jax.model.language.REMAT_POLICIES`.
      scan_layers: run alike consecutive decoder layers (and vision blocks) as one
        `lax.scan` over their stacked parameters (MaxText's `scan_layers`): compile time stays
        flat in depth. The decoder layers are then stored stacked, `[layers, ...]` per run
        (`model/stacking.py`: no stacked copy per step; the train state and its checkpoints
        take that layout, our model checkpoints and HF conversion stay per layer); the vision
        blocks stay one module each, stacked per call.
      vision_remat: with `remat`, how the vision tower is rematerialised. "block": each
        block saves only its input, so the tower's N x hidden inputs of every block stay
        alive through the language model's backward pass (at 128K tokens, ~524K patches:
        ~40 GiB, as much as the whole language model's saved inputs). "tower": the tower
        saves only its own input and recomputes its forward when the backward pass reaches
        it, after the language model's activations are freed (one more tower forward,
        about a quarter of the tower's cost; peak memory is the larger of the two parts
        instead of their sum).
    """

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    attention: AttentionConfig = AttentionConfig()
    rope_index_style: RopeIndexStyle = "transformers"
    remat: bool = False
    remat_policy: str = "full"
    scan_layers: bool = False
    vision_remat: Literal["block", "tower"] = "block"

    def __post_init__(self) -> None:
        t = self.text
        if t.hidden_size % t.num_attention_heads:
            raise ValueError("text hidden_size must be divisible by num_attention_heads")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(
                f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        layers = self.attention.layers
        if layers is not None:
            bad = [i for i in layers if not 0 <= i < t.num_hidden_layers]
            if bad:
                raise ValueError(f"attention.layers {bad} outside [0, {t.num_hidden_layers})")
        if self.remat_policy not in REMAT_POLICY_NAMES:
            raise ValueError(
                f"remat_policy must be one of {REMAT_POLICY_NAMES}, got {self.remat_policy!r}"
            )
        if self.vision_remat not in ("block", "tower"):
            raise ValueError(f"vision_remat must be 'block' or 'tower', got {self.vision_remat!r}")
        if self.rope_index_style not in ("transformers", "qwen"):
            raise ValueError(
                f"rope_index_style must be 'transformers' or 'qwen', got {self.rope_index_style!r}"
            )

    @property
    def nsa(self) -> NSAConfig | None:
        """`attention.nsa`: the NSA settings, None for plain Qwen2.5-VL."""
        return self.attention.nsa

    def uses_nsa(self, layer: int) -> bool:
        """Whether decoder layer `layer` is hybrid (NSA for video queries)."""
        return self.attention.uses_nsa(layer)

    @property
    def architecture(self) -> str:
        return VIDEONSA_ARCH if self.nsa is not None else QWEN_ARCH

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def with_attention(self, **kw: Any) -> ModelConfig:
        """This config with the `AttentionConfig` fields `kw` changed."""
        return dataclasses.replace(self, attention=self.attention.replace(**kw))

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf(
        cls,
        path_or_dict: str | os.PathLike | dict[str, Any],
        *,
        gated_layers: Sequence[int] = (),
    ) -> ModelConfig:
        """Reads a Hugging Face Qwen2.5-VL / VideoNSA `config.json` (a dict, a file or a dir).

        NSA is on when the config has an `"nsa"` key (ours), declares a VideoNSA architecture
        (`NSA_ARCHITECTURES`), or `gated_layers` (the decoder layers whose checkpoint carries
        VideoNSA's gate tensors) is not empty. Without an `"nsa"` key the setting is the
        released one (`videonsa_compat`, the "qwen" rope index) on the gated layers (all
        layers when none or all are gated). The keys VideoNSA's code reads, `block_counts`
        and `window_size` (`RELEASED_NSA_KEYS`), set the number of selected blocks and the
        window; beside an `"nsa"` key they must agree with it.
        """
        if isinstance(path_or_dict, dict):
            d, where = path_or_dict, "<dict>"
        else:
            where = os.fspath(path_or_dict)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            if not os.path.isfile(where):
                raise ValueError(f"{where}: missing; a model directory holds its config.json")
            with open(where) as f:
                try:
                    d = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from None
        try:
            return cls.read_hf_dict(d, where, gated_layers)
        except ValueError as e:
            if str(e).startswith(where):
                raise
            raise ValueError(f"{where}: {e}") from None
        except (KeyError, TypeError) as e:
            what = f"key {e} is missing" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{where}: {what}") from None

    @classmethod
    def read_hf_dict(
        cls, d: dict[str, Any], where: str, gated_layers: Sequence[int]
    ) -> ModelConfig:
        """`from_hf` of a dict read from `where` (named in errors)."""
        archs = d.get("architectures") or [QWEN_ARCH]
        unknown = [a for a in archs if a not in KNOWN_ARCHITECTURES]
        if unknown:
            raise ValueError(
                f"{where}: unknown architecture {unknown[0]!r}; expected one of "
                f"{list(KNOWN_ARCHITECTURES)}"
            )
        if d.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
            raise ValueError(f"{where}: model_type {d.get('model_type')!r} is not 'qwen2_5_vl'")
        td = dict(d.get("text_config") or {})
        for key, val in d.items():  # flat layout: text fields at the top level
            if key not in ("text_config", "vision_config"):
                td.setdefault(key, val)
        rope = td.get("rope_parameters") or td.get("rope_scaling") or {}
        text = TextConfig(
            vocab_size=td["vocab_size"],
            hidden_size=td["hidden_size"],
            intermediate_size=td["intermediate_size"],
            num_hidden_layers=td["num_hidden_layers"],
            num_attention_heads=td["num_attention_heads"],
            num_key_value_heads=td.get("num_key_value_heads") or td["num_attention_heads"],
            rms_norm_eps=td.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", td.get("rope_theta", 1000000.0))),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            hidden_act=td.get("hidden_act", "silu"),
            max_position_embeddings=td.get("max_position_embeddings", 128000),
            tie_word_embeddings=bool(
                d.get("tie_word_embeddings") or td.get("tie_word_embeddings") or False
            ),
        )
        vd = d.get("vision_config") or {}
        defaults = VisionConfig()
        vrope = vd.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=vd.get("depth", defaults.depth),
            hidden_size=vd.get("hidden_size", defaults.hidden_size),
            intermediate_size=vd.get("intermediate_size", defaults.intermediate_size),
            num_heads=vd.get("num_heads", defaults.num_heads),
            in_channels=vd.get("in_channels", vd.get("in_chans", defaults.in_channels)),
            patch_size=vd.get("patch_size", defaults.patch_size),
            temporal_patch_size=vd.get("temporal_patch_size", defaults.temporal_patch_size),
            spatial_merge_size=vd.get("spatial_merge_size", defaults.spatial_merge_size),
            window_size=vd.get("window_size", defaults.window_size),
            out_hidden_size=vd.get("out_hidden_size", text.hidden_size),
            fullatt_block_indexes=tuple(
                vd.get("fullatt_block_indexes", defaults.fullatt_block_indexes)
            ),
            tokens_per_second=vd.get("tokens_per_second", defaults.tokens_per_second),
            hidden_act=vd.get("hidden_act", defaults.hidden_act),
            rope_theta=float(vrope.get("rope_theta", defaults.rope_theta)),
        )
        kw: dict[str, Any] = {}
        nd = d.get("nsa")
        nsa: NSAConfig | None = None
        attention: dict[str, Any] = {}  # AttentionConfig fields besides nsa
        if nd is not None:
            nd = dict(nd)
            # the backend is the running program's choice, not the checkpoint's: configs written
            # before it left the file may still hold it, and it is not read from them
            nd.pop("nsa_implementation", None)
            if "nsa_layers" in nd:
                layers = nd.pop("nsa_layers")
                attention["layers"] = None if layers is None else tuple(layers)
            if "compat_lse_layout" in nd:
                attention["lse_layout"] = nd.pop("compat_lse_layout")
            if "rope_index_style" in nd:
                kw["rope_index_style"] = nd.pop("rope_index_style")
            nsa = NSAConfig(**nd)
        elif any(a in NSA_ARCHITECTURES for a in archs) or gated_layers:
            # a released VideoNSA checkpoint declares no NSA key: its code hard-codes the
            # released setting and arithmetic
            layers = tuple(sorted(set(gated_layers)))
            nsa = NSAConfig(videonsa_compat=True)
            attention = {"layers": layers if 0 < len(layers) < text.num_hidden_layers else None}
            kw["rope_index_style"] = "qwen"
        if nsa is not None:
            nsa = released_nsa_keys(nsa, td, where, explicit=nd is not None)
            kw["attention"] = AttentionConfig(nsa=nsa, **attention)
        if "rope_index_style" in d:
            kw["rope_index_style"] = d["rope_index_style"]
        ids = {}
        for key in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
        ):
            if key in d:
                ids[key] = d[key]
        return cls(vision=vision, text=text, **ids, **kw)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict (flat layout of the official checkpoints)."""
        t, v = self.text, self.vision
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "qwen2_5_vl",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "rope_index_style": self.rope_index_style,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "vision_config": {
                "model_type": "qwen2_5_vl",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "window_size": v.window_size,
                "out_hidden_size": v.out_hidden_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
                "hidden_act": v.hidden_act,
            },
        }
        a = self.attention
        if a.nsa is not None:
            nd = dataclasses.asdict(a.nsa)
            nd.update(
                nsa_layers=None if a.layers is None else list(a.layers),
                compat_lse_layout=a.lse_layout,
            )
            d["nsa"] = nd
            d.update({key: getattr(a.nsa, f) for key, f in RELEASED_NSA_KEYS.items()})
        return d

    def merge_into_hf(self, original: dict[str, Any]) -> dict[str, Any]:
        """`original` (a config.json dict of any layout) with this config written over it:
        every field `to_hf` writes goes where `original` keeps it (its `text_config` when it
        has one, its `rope_parameters` for the rope), other keys are kept, and NSA keys are
        dropped when NSA is off. The architecture stays `original`'s when it agrees on NSA.
        """
        out = copy.deepcopy(original)
        text = out.get("text_config")
        home = text if isinstance(text, dict) else out
        ours = self.to_hf()
        nsa_arch = any(a in NSA_ARCHITECTURES for a in out.get("architectures") or [])
        if nsa_arch == (self.nsa is not None) and out.get("architectures"):
            ours.pop("architectures")
        if self.nsa is None:
            for d in (out, home):
                for key in ("nsa", *RELEASED_NSA_KEYS):
                    d.pop(key, None)
        rope = home.get("rope_parameters")
        if isinstance(rope, dict):
            rope.update(rope_theta=ours.pop("rope_theta"))
            rope.update(mrope_section=ours.pop("rope_scaling")["mrope_section"])
        for key, value in ours.items():
            if key == "vision_config":
                out.setdefault("vision_config", {}).update(value)
            elif key in home:
                home[key] = value
            else:
                out[key] = value
        return out


def released_nsa_keys(
    nsa: NSAConfig, d: dict[str, Any], where: str, *, explicit: bool
) -> NSAConfig:
    """`nsa` with the `RELEASED_NSA_KEYS` present in the config dict `d` applied; with an
    `explicit` ("nsa" key) setting they must agree with it."""
    for key, field in RELEASED_NSA_KEYS.items():
        if key not in d:
            continue
        value = d[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {key} must be an integer, got {value!r}")
        if explicit and value != getattr(nsa, field):
            raise ValueError(
                f"{where}: {key} {value} disagrees with nsa.{field} {getattr(nsa, field)}; "
                "make them equal"
            )
        nsa = dataclasses.replace(nsa, **{field: value})
    return nsa


# ModelConfig keys of configs saved before the attention settings became one object
# (`ModelConfig.attention`) -> their `AttentionConfig` field
LEGACY_ATTENTION_KEYS = {
    "nsa": "nsa",
    "nsa_layers": "layers",
    "nsa_implementation": "implementation",
    "compat_lse_layout": "lse_layout",
}


def upgrade_model_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A (possibly partial) `ModelConfig` dict as `train.config.to_dict` writes it, with the
    flat keys of older saved configs (`LEGACY_ATTENTION_KEYS`) moved under `attention`; a
    current dict comes back unchanged."""
    legacy = {k: d[k] for k in LEGACY_ATTENTION_KEYS if k in d}
    if not legacy:
        return d
    out = {k: v for k, v in d.items() if k not in legacy}
    attention = dict(out.get("attention") or {})
    for key, value in legacy.items():
        attention.setdefault(LEGACY_ATTENTION_KEYS[key], value)
    out["attention"] = attention
    return out


# ---------------------------------------------------------------------- presets

# The Qwen2.5-VL presets keep the default rope_index_style "transformers": it is what
# `from_hf` gives the official config.json and what the installed transformers (our parity
# reference) runs for those checkpoints. The VideoNSA presets use "qwen": VideoNSA's code ran
# the original rope index (transformers 4.x), and `from_hf` reads its config that way.
_QWEN_7B = ModelConfig(
    vision=VisionConfig(out_hidden_size=3584),
    text=TextConfig(),
)
_QWEN_3B = ModelConfig(
    vision=VisionConfig(out_hidden_size=2048),
    text=TextConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
)
_VIDEONSA_NSA = NSAConfig(block_size=64, num_selected=32, window=256, gate_temperature=0.3)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vision=VisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            window_size=56,
            out_hidden_size=64,
            fullatt_block_indexes=(1,),
            tokens_per_second=2,
        ),
        text=TextConfig(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=10000.0,
            mrope_section=(2, 3, 3),
            max_position_embeddings=4096,
        ),
        image_token_id=997,
        video_token_id=998,
        vision_start_token_id=995,
        vision_end_token_id=996,
    ),
    "qwen2.5-vl-3b": _QWEN_3B,
    "qwen2.5-vl-7b": _QWEN_7B,
    "videonsa-7b": _QWEN_7B.replace(
        attention=AttentionConfig(nsa=dataclasses.replace(_VIDEONSA_NSA, videonsa_compat=True)),
        rope_index_style="qwen",
    ),
    "videonsa-7b-clean": _QWEN_7B.replace(
        attention=AttentionConfig(nsa=_VIDEONSA_NSA), rope_index_style="qwen"
    ),
}


def preset(name: str) -> ModelConfig:
    """A named configuration: tiny, qwen2.5-vl-3b, qwen2.5-vl-7b, videonsa-7b, videonsa-7b-clean."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
