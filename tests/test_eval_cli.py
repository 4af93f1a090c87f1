"""`nsa-jax generate` and `nsa-jax eval` end to end: a tiny random checkpoint with the real Qwen
vocabulary (built offline), videos written with `av`, a corrupt video among them."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from nsa_jax import cli
from nsa_jax.config import ModelConfig
from nsa_jax.convert.checkpoint import save_checkpoint
from nsa_jax.convert.load import params_of
from nsa_jax.data.synthetic import SyntheticConfig, write_dataset, write_video
from nsa_jax.data.tokenizer import build_qwen_tokenizer
from nsa_jax.eval.video_qa import VideoQA, VideoSampling
from nsa_jax.model.vlm import init_model

TINY_QWEN_VOCAB = ModelConfig(  # Qwen2.5-VL's special token ids are ModelConfig's defaults
    vision=dataclasses.replace(
        ModelConfig().vision,
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        fullatt_block_indexes=(1,),
    ),
    text=dataclasses.replace(
        ModelConfig().text,
        vocab_size=151_936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
        tie_word_embeddings=True,
    ),
)
# small frames, few frames: 4 frames of 96 x 128 become 84 x 140, 30 video tokens
VIDEO_ARGS = ["--fps", "2", "--max-frames", "4", "--min-pixels", "3136", "--max-pixels", "12544"]
SAMPLING = VideoSampling(fps=2, max_frames=4, min_pixels=3136, max_pixels=12544)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("ckpt")
    extra = root / "tokenizer"
    os.makedirs(extra)
    build_qwen_tokenizer().save(str(extra / "tokenizer.json"))
    path = str(root / "ckpt")
    save_checkpoint(
        path, TINY_QWEN_VOCAB, params_of(init_model(TINY_QWEN_VOCAB, seed=1)), extra_from=str(extra)
    )
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (16, 96, 128, 3), dtype=np.uint8)
    return write_video(str(tmp_path_factory.mktemp("videos") / "clip.mp4"), frames, fps=8)


def test_generate_streams_the_answer_the_api_gives(ckpt, video, capsys):
    argv = [
        "generate",
        "--ckpt",
        ckpt,
        "--video",
        video,
        "--prompt",
        "What happens?",
        "--max-new-tokens",
        "6",
        "--dtype",
        "float32",
        *VIDEO_ARGS,
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    qa = VideoQA(ckpt, dtype="float32", sampling=SAMPLING)
    pieces: list[str] = []
    answer = qa.answer(video, "What happens?", 6, on_text=pieces.append)
    assert printed == answer + "\n" and "".join(pieces) == answer
    inputs = qa.inputs(video, "What happens?")
    assert inputs["video_grid_thw"].tolist() == [[2, 6, 10]]  # 84 x 140 frames
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # as VideoNSA's wrapper set it


def test_generate_reports_an_unreadable_video(ckpt, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    argv = ["generate", "--ckpt", ckpt, "--video", str(bad), "--prompt", "?", "--dtype", "float32"]
    assert cli.main(argv) == 1
    assert "nsa-jax generate: error:" in capsys.readouterr().err


def test_eval_scores_a_task_and_counts_the_failed_video(ckpt, tmp_path, capsys):
    cfg = SyntheticConfig(num_frames=16, height=64, width=64, event_frames=2)
    ann = write_dataset(tmp_path / "videos", task="needle", num_videos=2, cfg=cfg)
    with open(ann) as f:
        records = [json.loads(line) for line in f]
    broken = dict(records[0], id="broken", video="missing.mp4")
    extra = dict(records[1], id="beyond-the-limit")
    with open(ann, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in [*records, broken, extra]))
    out = tmp_path / "out"
    argv = [
        "eval",
        "--ckpt",
        ckpt,
        "--task",
        "needle",
        "--annotations",
        ann,
        "--video-root",
        str(tmp_path / "videos"),
        "--out",
        str(out),
        "--limit",
        "3",
        "--dtype",
        "float32",
        *VIDEO_ARGS,
    ]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "needle"
    assert res["counts"]["samples"] == 3 and res["counts"]["scored"] == 2
    assert res["counts"]["failed"] == 1 and res["failed_videos"][0]["id"] == "broken"
    assert 0.0 <= res["overall"] <= 100.0
    assert res["settings"]["sampling"]["max_frames"] == 4
    captured = capsys.readouterr()
    assert "needle: " in captured.out and "1 failed videos" in captured.out
    assert "failed video" in captured.err and "3/3" in captured.err
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3


def test_eval_refuses_a_malformed_annotation_file(ckpt, tmp_path, capsys):
    ann = tmp_path / "mc.jsonl"
    ann.write_text('{"video": "a.mp4", "question": "?"}\n')
    argv = [
        "eval",
        "--ckpt",
        ckpt,
        "--task",
        "jsonl",
        "--annotations",
        str(ann),
        "--video-root",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 1
    assert "mc.jsonl:1: missing field 'options'" in capsys.readouterr().err


def exit_status(argv: list[str]) -> int:
    """`cli.main`'s status, argparse's own exit (a bad option value: 2) included."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(VideoQA, "__init__", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--max-frames", "-3"],
            "argument --max-frames: must be at least 2 (frames go to the model in pairs), got -3",
        ),
        (["--fps", "0"], "argument --fps: must be above 0, got 0"),
        (["--fps", "fast"], "argument --fps: expected a number, got 'fast'"),
        (
            ["--second-per-grid-ts", "-1"],
            "argument --second-per-grid-ts: must be above 0 seconds (or 'auto'), got -1",
        ),
        (["--min-pixels", "-1"], "argument --min-pixels: must be at least 1, got -1"),
        (
            ["--min-pixels", "5000", "--max-pixels", "3000"],
            "--min-pixels 5000 is above --max-pixels 3000",
        ),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (["--top-p", "1.5"], "argument --top-p: must be at most 1, got 1.5"),
        (["--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
    ],
)
def test_generate_refuses_option_values_in_the_options_own_words(
    ckpt, extra, message, capsys, no_model
):
    assert exit_status(["generate", "--ckpt", ckpt, "--prompt", "?", *extra]) == 2
    err = capsys.readouterr().err
    assert f"nsa-jax generate: error: {message}" in err
    for internal in ("smart_nframes", "num_frames", "min_pixels", "Traceback"):
        assert internal not in err


def test_generate_reports_a_missing_video_before_loading_the_model(
    ckpt, tmp_path, capsys, no_model
):
    argv = ["generate", "--ckpt", ckpt, "--video", str(tmp_path / "nope.mp4"), "--prompt", "?"]
    assert exit_status(argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"nsa-jax generate: error: --video {tmp_path / 'nope.mp4'}: no such file"
    )


@pytest.mark.parametrize("case", ["annotations", "video-root", "out", "limit 0", "limit -2"])
def test_eval_checks_its_inputs_before_loading_the_model(ckpt, tmp_path, case, capsys, no_model):
    ann = write_dataset(
        tmp_path / "videos",
        task="needle",
        num_videos=1,
        cfg=SyntheticConfig(num_frames=8, height=32, width=32),
    )
    (tmp_path / "a_file").write_text("")
    paths = {
        "annotations": ann,
        "video-root": str(tmp_path / "videos"),
        "out": str(tmp_path / "out"),
    }
    typo = {
        "annotations": str(tmp_path / "typo.jsonl"),
        "video-root": "/typo",
        "out": str(tmp_path / "a_file"),
    }
    if case in typo:
        paths[case] = typo[case]
    argv = [
        "eval",
        "--ckpt",
        ckpt,
        "--task",
        "needle",
        *(x for k, v in paths.items() for x in (f"--{k}", v)),
    ]
    if case.startswith("limit"):
        argv += ["--limit", case.split()[1]]
    expected, status = {
        "annotations": (f"--annotations {typo['annotations']}: no such file", 1),
        "video-root": ("--video-root /typo: no such directory", 1),
        "out": (f"--out {typo['out']}: a file, not a directory", 1),
        "limit 0": ("argument --limit: must be at least 1, got 0", 2),
        "limit -2": ("argument --limit: must be at least 1, got -2", 2),
    }[case]
    assert exit_status(argv) == status
    assert f"nsa-jax eval: error: {expected}" in capsys.readouterr().err


def test_eval_that_scores_nothing_fails_with_a_null_score(ckpt, tmp_path, capsys):
    ann = write_dataset(
        tmp_path / "videos",
        task="needle",
        num_videos=2,
        cfg=SyntheticConfig(num_frames=8, height=32, width=32),
    )
    out = tmp_path / "out"
    argv = [
        "eval",
        "--ckpt",
        ckpt,
        "--task",
        "needle",
        "--annotations",
        ann,
        "--video-root",
        str(tmp_path / "elsewhere"),
        "--out",
        str(out),
        "--dtype",
        "float32",
    ]
    os.makedirs(tmp_path / "elsewhere")  # exists, but holds none of the videos
    assert cli.main(argv) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["overall"] is None and res["counts"]["scored"] == 0
    assert res["counts"]["failed"] == 2 and len(res["failed_videos"]) == 2
    captured = capsys.readouterr()
    assert "needle: nothing scored  (0 scored, 2 failed videos" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "nsa-jax eval: error: no sample was scored (2 of 2 videos failed; failed_videos in "
        f"{out / 'results.json'})"
    )
