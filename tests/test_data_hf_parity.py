"""Parity with transformers' Qwen2.5-VL processor (`Qwen2VLVideoProcessor` + `Qwen2_5_VLProcessor`).

transformers builds its video processor on torchvision, which the project's environment leaves
out, so these tests are `slow` and skip without torchvision. How they were run, and the result,
is in docs/data.md ("Parity with transformers"). The default suite pins the same patch layout
against an independent NumPy oracle (`test_data_video.py::test_video_to_patches_matches_oracle`).
"""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import qwen_tokenizer

from nsa_jax.data import load_video, probe_video, video_to_patches
from nsa_jax.data.processor import encode_chat, process_sample
from nsa_jax.data.synthetic import write_video
from nsa_jax.data.video import FACTOR, PATCH_SIZE, resized_size, sample_indices

pytestmark = pytest.mark.slow

TOL = 1e-5  # the bound on max |ours - transformers|


@pytest.fixture(scope="module")
def hf() -> dict:
    """transformers' processor classes; skips when torchvision (their backend) is absent."""
    pytest.importorskip("torchvision")
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    return {
        "video": Qwen2VLVideoProcessor,
        "image": Qwen2VLImageProcessor,
        "processor": Qwen2_5_VLProcessor,
        "tokenizer": PreTrainedTokenizerFast,
        "metadata": VideoMetadata,
    }


@pytest.mark.parametrize("shape", [(4, 56, 84), (3, 28, 56), (8, 112, 224), (1, 84, 28)])
def test_patches_equal_transformers_on_the_same_frames(hf, rng: np.random.Generator,
                                                       shape) -> None:
    frames = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ours, grid = video_to_patches(frames)
    # The frames are already at a smart_resize size, so transformers' resize is the identity;
    # do_resize stays on to show that, rather than being switched off.
    proc = hf["video"](min_pixels=FACTOR * FACTOR, max_pixels=10**6, cap_pixels_per_frame=True)
    theirs = proc(videos=[frames], return_tensors="np")
    np.testing.assert_array_equal(theirs["video_grid_thw"], grid)
    assert theirs["pixel_values_videos"].shape == ours.shape
    assert np.abs(theirs["pixel_values_videos"] - ours).max() <= TOL


@pytest.mark.parametrize(
    ("frames", "height", "width", "max_video_tokens"),
    [(8, 97, 131, 128000), (8, 1080, 1920, 128000), (40, 360, 640, 2000),
     (6, 30, 500, 128000), (64, 480, 270, 3000), (2, 14, 14, 128000)],
)
def test_resize_target_equals_transformers(hf, frames: int, height: int, width: int,
                                           max_video_tokens: int) -> None:
    """Same `(H, W)` from Qwen's smart_resize under the per-frame and whole-clip pixel caps."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    proc = hf["video"](max_video_tokens=max_video_tokens, cap_pixels_per_frame=True)
    theirs = proc(videos=[video], return_tensors="np")["video_grid_thw"][0]
    h, w = resized_size(height, width, frames,
                        total_pixels=int(max_video_tokens * FACTOR * FACTOR * 0.9))
    np.testing.assert_array_equal(theirs, [frames // 2, h // PATCH_SIZE, w // PATCH_SIZE])


def test_full_processor_equals_transformers_on_a_decoded_video(hf, tmp_path,
                                                               rng: np.random.Generator) -> None:
    """input_ids (with `<|video_pad|>` expanded), pixels, grid and second_per_grid_ts."""
    n, fps = 36, 10.0
    path = write_video(tmp_path / "v.mp4", rng.integers(0, 256, (n, 64, 96, 3), np.uint8),
                       fps=fps)
    pixels = {"min_pixels": FACTOR * FACTOR, "max_pixels": 16 * FACTOR * FACTOR}
    video = load_video(path, fps=2.5, **pixels)
    tok = qwen_tokenizer()
    msgs = [{"role": "user", "content": "<video>\nWhat happens?"},
            {"role": "assistant", "content": "Noise drifts."}]
    ours = process_sample(tok, msgs, [video])

    # transformers expands one <|video_pad|> per video itself: hand it the unexpanded text.
    text = tok.decode(encode_chat(tok, msgs, [1]).input_ids.tolist(), skip_special_tokens=False)
    proc = hf["processor"](
        image_processor=hf["image"](),
        tokenizer=hf["tokenizer"](tokenizer_object=tok),
        video_processor=hf["video"](**pixels, cap_pixels_per_frame=True),
    )
    info = probe_video(path)
    meta = hf["metadata"](total_num_frames=info.num_frames, fps=info.fps,
                          frames_indices=sample_indices(0, n - 1, len(video.frames)).tolist())
    theirs = proc(text=[text], videos=[video.frames], video_metadata=[meta],
                  do_sample_frames=False, return_tensors="np")

    np.testing.assert_array_equal(theirs["input_ids"][0], ours["input_ids"])
    np.testing.assert_array_equal(theirs["video_grid_thw"], ours["video_grid_thw"])
    assert np.abs(theirs["pixel_values_videos"] - ours["pixel_values_videos"]).max() <= TOL
    np.testing.assert_allclose(theirs["second_per_grid_ts"], ours["second_per_grid_ts"],
                               rtol=1e-6)
