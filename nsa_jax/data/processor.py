"""Text side of Qwen2.5-VL: chat template, `<|video_pad|>` expansion, labels, position ids.

The rendering follows Qwen2.5-VL's `chat_template.json`:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (if no system turn)
    <|im_start|>user\\n<|vision_start|><|video_pad|>*N<|vision_end|>question<|im_end|>\\n
    <|im_start|>assistant\\nanswer<|im_end|>\\n

A `<video>` placeholder in a message (LLaVA-Video and ms-swift annotations use it) becomes
`<|vision_start|><|video_pad|><|vision_end|>`; a sample whose text has no placeholder gets its
videos at the start of the first user turn. Each `<|video_pad|>` is expanded to
`t * h * w / 4` copies (one per merged patch), inserted as ids rather than tokenized text.

Labels: the assistant's content and its closing `<|im_end|>` are supervised (token id), all
else is `IGNORE` (-100). Labels are aligned with `input_ids` (not shifted): the loss shifts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tokenizers

from nsa_jax.config import ModelConfig, preset
from nsa_jax.data.tokenizer import SPECIAL_IDS
from nsa_jax.data.video import TEMPORAL_PATCH_SIZE, Video, num_video_tokens, video_to_patches

IGNORE = -100
DEFAULT_SYSTEM = "You are a helpful assistant."
VIDEO_PLACEHOLDER = "<video>"
IM_START, IM_END = SPECIAL_IDS["<|im_start|>"], SPECIAL_IDS["<|im_end|>"]
VISION_START, VISION_END = SPECIAL_IDS["<|vision_start|>"], SPECIAL_IDS["<|vision_end|>"]
VIDEO_PAD = SPECIAL_IDS["<|video_pad|>"]
PAD_ID = SPECIAL_IDS["<|endoftext|>"]
ROLES = ("system", "user", "assistant")

# (input_ids [L], video_grid_thw [V, 3], second_per_grid_ts [V]) -> position ids [3, L]
RopeIndexFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized sample.

    Attributes:
      input_ids: int32 `[L]`.
      labels: int32 `[L]`, `IGNORE` outside assistant answers.
    """

    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def count_video_placeholders(messages: Sequence[dict[str, str]]) -> int:
    return sum(m["content"].count(VIDEO_PLACEHOLDER) for m in messages)


def encode_chat(
    tokenizer: tokenizers.Tokenizer,
    messages: Sequence[dict[str, str]],
    video_tokens: Sequence[int] = (),
    *,
    system: str | None = DEFAULT_SYSTEM,
    add_generation_prompt: bool = False,
) -> Encoded:
    """Renders and tokenizes a conversation with Qwen2.5-VL's chat template.

    Args:
      tokenizer: a Qwen2.5-VL `tokenizers.Tokenizer` (see `tokenizer.load_tokenizer`).
      messages: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`; `<video>`
        marks where each video goes.
      video_tokens: `<|video_pad|>` count of each video, in order (`num_video_tokens(grid)`).
      system: the default system prompt added when the first turn is not a system turn
        (None: add none).
      add_generation_prompt: end with `<|im_start|>assistant\\n` (for generation).

    Returns:
      `Encoded` with `input_ids` and `labels`, int32 `[L]`.
    """
    if not messages:
        raise ValueError("encode_chat: no messages")
    messages = _place_videos(messages, len(video_tokens))
    ids: list[int] = []
    labels: list[int] = []

    def text(s: str, train_from: int | None = None) -> None:
        """Tokenizes `s` as one string (as transformers' processor tokenizes the text between
        two special tokens); supervises the tokens that end past character `train_from`."""
        if s:
            enc = tokenizer.encode(s, add_special_tokens=False)
            ids.extend(enc.ids)
            labels.extend(i if train_from is not None and end > train_from else IGNORE
                          for i, (_, end) in zip(enc.ids, enc.offsets, strict=True))

    def tok(i: int, train: bool = False) -> None:
        ids.append(i)
        labels.append(i if train else IGNORE)

    videos = iter(video_tokens)
    if messages[0]["role"] != "system" and system is not None:
        tok(IM_START), text(f"system\n{system}"), tok(IM_END), text("\n")
    for m in messages:
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"encode_chat: unknown role {role!r}; use one of {ROLES}")
        train = role == "assistant"
        header = f"{role}\n"
        tok(IM_START)
        pieces = content.split(VIDEO_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k:
                n = next(videos)
                ids.extend([VISION_START, *([VIDEO_PAD] * n), VISION_END])
                labels.extend([IGNORE] * (n + 2))
            # the header and the text up to the first video are one string (a content that
            # starts with a newline merges with the header's into one token, as in transformers)
            start = len(header) if k == 0 else 0
            text(header + piece if k == 0 else piece, start if train else None)
        tok(IM_END, train), text("\n")
    if add_generation_prompt:
        tok(IM_START), text("assistant\n")
    return Encoded(np.asarray(ids, np.int32), np.asarray(labels, np.int32))


def _place_videos(messages: Sequence[dict[str, str]], num_videos: int) -> list[dict[str, str]]:
    """Checks placeholders against the video count; with none, puts all videos first in the
    first user turn (as LLaVA-style data without `<video>` expects)."""
    msgs = [dict(m) for m in messages]
    found = count_video_placeholders(msgs)
    if found == num_videos:
        return msgs
    if found == 0:
        for m in msgs:
            if m["role"] == "user":
                m["content"] = VIDEO_PLACEHOLDER * num_videos + m["content"]
                return msgs
        raise ValueError("encode_chat: videos given but no user turn to attach them to")
    raise ValueError(
        f"encode_chat: {found} <video> placeholders but {num_videos} videos; make them match"
    )


def rope_index_for(model_cfg: ModelConfig) -> RopeIndexFn:
    """The pipeline's `rope_index_fn` for a model: `position_ids` equal to what `model(...)`
    computes (its token ids, merge size, tokens per second and `rope_index_style`)."""
    from nsa_jax.model.rope import get_rope_index  # the model owns the rope definition

    def rope_index(input_ids: np.ndarray, video_grid_thw: np.ndarray,
                   second_per_grid_ts: np.ndarray) -> np.ndarray:
        """Qwen2.5-VL 3D positions `[3, L]` for one sample."""
        grid = np.asarray(video_grid_thw).reshape(-1, 3)
        has_video = bool(grid.shape[0])
        pos, _ = get_rope_index(
            np.asarray(input_ids)[None],
            image_token_id=model_cfg.image_token_id,
            video_token_id=model_cfg.video_token_id,
            spatial_merge_size=model_cfg.vision.spatial_merge_size,
            tokens_per_second=model_cfg.vision.tokens_per_second,
            video_grid_thw=grid if has_video else None,
            second_per_grid_ts=np.asarray(second_per_grid_ts, np.float32) if has_video else None,
            style=model_cfg.rope_index_style,
        )
        return pos[:, 0]

    return rope_index


def qwen25vl_rope_index(
    input_ids: np.ndarray, video_grid_thw: np.ndarray, second_per_grid_ts: np.ndarray
) -> np.ndarray:
    """Qwen2.5-VL 3D positions `[3, L]` for one sample, as the `qwen2.5-vl-7b` preset (and
    transformers) computes them; use `rope_index_for(model_cfg)` for another model."""
    return rope_index_for(preset("qwen2.5-vl-7b"))(input_ids, video_grid_thw, second_per_grid_ts)


def process_sample(
    tokenizer: tokenizers.Tokenizer,
    messages: Sequence[dict[str, str]],
    videos: Sequence[Video] = (),
    *,
    system: str | None = DEFAULT_SYSTEM,
    rope_index_fn: RopeIndexFn | None = None,
    pixel_dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
    """Model inputs for one sample (the per-sample part of the Qwen2.5-VL processor).

    Returns a dict with
      input_ids, labels: int32 `[L]`;
      pixel_values_videos: `[N, 1176]` (`pixel_dtype`), all videos' patches concatenated;
      video_grid_thw: int32 `[V, 3]`; second_per_grid_ts: float32 `[V]`;
      position_ids: int32 `[3, L]` when `rope_index_fn` is given (e.g. `qwen25vl_rope_index`).
    """
    patches, grids, seconds = [], [], []
    for v in videos:
        pv, g = video_to_patches(v.frames)
        patches.append(pv.astype(pixel_dtype, copy=False))
        grids.append(g[0])
        seconds.append(TEMPORAL_PATCH_SIZE / v.sample_fps)
    grid = np.asarray(grids, np.int32).reshape(-1, 3)
    enc = encode_chat(tokenizer, messages, [num_video_tokens(g) for g in grid], system=system)
    out = {
        "input_ids": enc.input_ids,
        "labels": enc.labels,
        "pixel_values_videos": (
            np.concatenate(patches) if patches else np.zeros((0, 1176), pixel_dtype)
        ),
        "video_grid_thw": grid,
        "second_per_grid_ts": np.asarray(seconds, np.float32),
    }
    if rope_index_fn is not None:
        out["position_ids"] = np.asarray(
            rope_index_fn(enc.input_ids, grid, out["second_per_grid_ts"]), np.int32
        )
    return out
