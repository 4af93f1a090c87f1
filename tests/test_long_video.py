"""A long video end to end, in miniature: frames decoded on demand a chunk at a time
(`VideoPatches`), streamed through the vision tower in chunks and the layers in token chunks by
`nsa-jax generate`, which answers as the whole clip decoded at once does (CPU, f32)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_eval_cli import TINY_QWEN_VOCAB

from nsa_jax import cli, prefill
from nsa_jax.convert.checkpoint import save_checkpoint
from nsa_jax.convert.load import params_of
from nsa_jax.data import video as V
from nsa_jax.data.synthetic import write_video
from nsa_jax.data.tokenizer import build_qwen_tokenizer
from nsa_jax.eval.video_qa import STOP_TOKENS, VideoQA, VideoSampling
from nsa_jax.generate import generate
from nsa_jax.model.vlm import init_model

# 24 s at 4 fps sampled at 2 fps: 48 frames of 84 x 140 (24 temporal patches of 6 x 10)
FRAMES = 48
ARGS = ["--fps", "2", "--max-frames", str(FRAMES), "--min-pixels", "3136", "--max-pixels", "12544"]
SAMPLING = VideoSampling(fps=2, max_frames=FRAMES, min_pixels=3136, max_pixels=12544)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("ckpt")
    os.makedirs(root / "tokenizer")
    build_qwen_tokenizer().save(str(root / "tokenizer" / "tokenizer.json"))
    path = str(root / "ckpt")
    model = init_model(TINY_QWEN_VOCAB, seed=2)
    save_checkpoint(path, TINY_QWEN_VOCAB, params_of(model), extra_from=str(root / "tokenizer"))
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> str:
    frames = np.random.default_rng(1).integers(0, 255, (96, 96, 128, 3), dtype=np.uint8)
    return write_video(str(tmp_path_factory.mktemp("videos") / "long.mp4"), frames, fps=4)


def test_video_patches_decode_only_the_frames_of_the_rows_asked(video, monkeypatch):
    plan = V.plan_video(video, fps=2, max_frames=FRAMES, min_pixels=3136, max_pixels=12544)
    whole, grid = V.video_to_patches(plan.decode().frames)
    np.testing.assert_array_equal(grid, plan.grid)
    assert grid.tolist() == [[FRAMES // 2, 6, 10]]
    decoded: list[int] = []
    real = V.decode_frames

    def counted(path, info, indices, size):
        decoded.append(len(indices))
        return real(path, info, indices, size)

    monkeypatch.setattr(V, "decode_frames", counted)
    patches = V.VideoPatches(plan)
    assert patches.shape == whole.shape
    np.testing.assert_array_equal(patches[120:300], whole[120:300])  # temporal patches 2..4
    np.testing.assert_array_equal(patches[1380:], whole[1380:])
    assert decoded == [6, 2]
    with pytest.raises(ValueError, match="not whole temporal patches of 60 rows"):
        patches[30:120]


def test_generate_streams_a_video_through_the_chunked_prefill(ckpt, video, capsys, monkeypatch):
    qa = VideoQA(ckpt, dtype="float32", sampling=SAMPLING)
    inputs = qa.inputs(video, "What happens?")
    assert isinstance(inputs["pixel_values_videos"], V.VideoPatches)
    # the whole clip decoded and patchified at once, the tower over it in one call
    whole = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"][:])
    want = generate(qa.model, **whole, max_new_tokens=5, eos_token_id=list(STOP_TOKENS))
    logits = np.asarray(qa.model(**whole))[0, -1]
    assert want[0, 0] == np.argmax(logits)  # its first token is the whole model's
    # the command: 4 temporal patches (8 frames) per tower call, 64 tokens per layer chunk
    monkeypatch.setattr(prefill, "VISION_PATCHES", 240)
    monkeypatch.setattr(prefill, "TOKEN_CHUNK", 64)
    argv = [
        "generate",
        "--ckpt",
        ckpt,
        "--video",
        video,
        "--prompt",
        "What happens?",
        "--max-new-tokens",
        "5",
        "--dtype",
        "float32",
        *ARGS,
    ]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    answer = qa.tokenizer.decode(want[0].tolist(), skip_special_tokens=True)
    assert out == answer + "\n"
    assert f"/{FRAMES} " in err and "tokens/s" in err  # progress: frames, then layers
