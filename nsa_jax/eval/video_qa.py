"""A checkpoint that answers questions about a video: the model behind `nsa-jax generate` and
`nsa-jax eval`.

A question is laid out as VideoNSA's lmms-eval wrapper (`models/simple/videonsa.py`) laid it
out: the system turn "You are a helpful assistant.", then one user turn holding the video and
then the text, then the assistant prompt; greedy decoding until `<|im_end|>` or
`<|endoftext|>`. The video is sampled as that wrapper asked qwen-vl-utils to sample it (`fps`,
at most `max_frames` frames, `min_pixels`..`max_pixels` a frame within the clip's
`total_pixels`), and `second_per_grid_ts` is 1.0 for every video, as the wrapper's processor
call (without `fps`) set it; `VideoSampling(second_per_grid_ts=None)` uses the clip's own
`2 / sample_fps` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from nsa_jax.ckpt import load_model, resolve_ckpt
from nsa_jax.data.processor import DEFAULT_SYSTEM, IM_END, PAD_ID, encode_chat
from nsa_jax.data.tokenizer import load_tokenizer
from nsa_jax.data.video import VIDEO_TOTAL_PIXELS, VideoPatches, num_video_tokens, plan_video
from nsa_jax.data.video import VideoError as DecodeError
from nsa_jax.eval.parsers import reasoning_answer
from nsa_jax.eval.runner import VideoError
from nsa_jax.generate import generate

STOP_TOKENS = (IM_END, PAD_ID)  # <|im_end|>, <|endoftext|>: Qwen2.5-VL's generation_config


@dataclasses.dataclass(frozen=True)
class VideoSampling:
    """How a video becomes frames; defaults are VideoNSA's lmms-eval wrapper's.

    Attributes:
      fps: frames sampled per second (the wrapper requires one; the published value is not in
        VideoNSA's repository, 1.0 here).
      max_frames: at most this many frames (the wrapper's `max_num_frames`, 32).
      min_frames: at least this many (qwen-vl-utils' 4).
      min_pixels, max_pixels: pixels a frame (the wrapper's 200,704 and 1,605,632; qwen-vl-utils
        caps a video frame at 602,112 whatever is asked).
      total_pixels: the whole clip's pixel budget (qwen-vl-utils' default).
      second_per_grid_ts: seconds per temporal patch given to the model; 1.0 as the wrapper's
        processor set it, or None for the clip's own `2 / sample_fps`.
    """

    fps: float = 1.0
    max_frames: int = 32
    min_frames: int = 4
    min_pixels: int = 200_704
    max_pixels: int = 1_605_632
    total_pixels: int = VIDEO_TOTAL_PIXELS
    second_per_grid_ts: float | None = 1.0


class VideoQA:
    """Loads a checkpoint and its tokenizer; `answer(video, prompt, max_new_tokens)` returns the
    decoded response.

    Args:
      ckpt: a training run (its latest step), a step, an exported model or a Hugging Face
        directory (`nsa_jax.ckpt.resolve_ckpt`, whose `CkptError` it raises).
      dtype: parameter and activation dtype name ("bfloat16", "float32").
      sampling: how videos are sampled.
      system: the system turn (None: no system turn).
      temperature, top_p, top_k, seed: decoding (greedy by default).
      progress: show the prefill's progress (frames through the vision tower, layers,
        tokens/s) on stderr.
    """

    def __init__(
        self,
        ckpt: str,
        *,
        dtype: str = "bfloat16",
        sampling: VideoSampling = VideoSampling(),
        system: str | None = DEFAULT_SYSTEM,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        source = resolve_ckpt(ckpt)
        self.tokenizer = load_tokenizer(source.tokenizer_dir)
        self.model = load_model(source, jnp.dtype(dtype))
        self.sampling, self.system = sampling, system
        self.decoding = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        self.progress = progress

    def inputs(self, video: str | None, prompt: str) -> dict[str, np.ndarray]:
        """The model's inputs for one question (batch 1): `input_ids [1, L]` and, with a video,
        `pixel_values_videos` (`[N, 1176]` rows decoded on demand: `VideoPatches`),
        `video_grid_thw [1, 3]`, `second_per_grid_ts [1]`. Raises `VideoError` when the video
        cannot be probed; a frame that fails to decode raises it from `answer`."""
        if video is None:
            enc = encode_chat(
                self.tokenizer,
                [{"role": "user", "content": prompt}],
                system=self.system,
                add_generation_prompt=True,
            )
            return {"input_ids": enc.input_ids[None]}
        s = self.sampling
        try:
            plan = plan_video(
                video,
                fps=s.fps,
                min_frames=s.min_frames,
                max_frames=s.max_frames,
                min_pixels=s.min_pixels,
                max_pixels=s.max_pixels,
                total_pixels=s.total_pixels,
            )
        except Exception as e:  # any failure to open or probe is the video's, not the model's
            raise VideoError(f"{type(e).__name__}: {e}") from e
        grid = plan.grid
        enc = encode_chat(
            self.tokenizer,
            [{"role": "user", "content": "<video>" + prompt}],
            [num_video_tokens(grid[0])],
            system=self.system,
            add_generation_prompt=True,
        )
        seconds = plan.second_per_grid if s.second_per_grid_ts is None else s.second_per_grid_ts
        return {
            "input_ids": enc.input_ids[None],
            "pixel_values_videos": VideoPatches(plan),
            "video_grid_thw": grid,
            "second_per_grid_ts": np.asarray([seconds], np.float32),
        }

    def answer(
        self,
        video: str | None,
        prompt: str,
        max_new_tokens: int,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The response to `prompt` about `video` (None: text only), special tokens removed.
        `on_text` receives the text as it grows (each call the new part)."""
        ids: list[int] = []
        shown = 0

        def on_step(tokens: np.ndarray) -> None:
            nonlocal shown
            ids.append(int(tokens[0]))
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if on_text is not None and not text.endswith("\ufffd") and len(text) > shown:
                on_text(text[shown:])
                shown = len(text)

        try:
            out = generate(
                self.model,
                **self.inputs(video, prompt),
                max_new_tokens=max_new_tokens,
                eos_token_id=list(STOP_TOKENS),
                on_step=on_step,
                progress=self.progress,
                **self.decoding,
            )
        except DecodeError as e:  # frames decoded as the vision tower reads them
            raise VideoError(f"{type(e).__name__}: {e}") from e
        return self.tokenizer.decode(out[0].tolist(), skip_special_tokens=True)

    def __call__(self, video: str, prompt: str, max_new_tokens: int) -> str:
        """`runner.Predict`, as VideoNSA's wrapper answered: `<image>` markers removed from the
        prompt, and lmms-eval's reasoning-answer extraction on the response (the text inside
        `<answer>...</answer>`, else inside `\\boxed{...}`, else all of it)."""
        response = self.answer(video, prompt.replace("<image>", ""), max_new_tokens)
        return reasoning_answer(response)
