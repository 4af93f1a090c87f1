"""From a training run to an answer: `--ckpt` resolution (`nsa_jax.ckpt`), `nsa-jax export`, and
the whole walk train -> export -> eval -> generate -> convert jax-to-hf on the tiny config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_step import ROOT, subprocess_env

from nsa_jax import cli
from nsa_jax.ckpt import CkptError, export_model, exported_from, read_params, resolve_ckpt
from nsa_jax.eval.tasks import get_task, load_samples
from nsa_jax.train.checkpoint import read_step_params, step_config, step_params
from nsa_jax.train.config import load_config
from nsa_jax.train.loop import tokenizer_for

# one decoder layer, one vision block, two 1-second videos of 56 x 56: the compile is the cost.
# An untied output head answers in varied tokens (a tied one, barely trained, repeats the
# prompt's last token, a newline), so that two equal answers say something.
OVERRIDES = [
    "eval_every=0",
    "tensorboard=false",
    "model.text.num_hidden_layers=1",
    "model.vision.depth=1",
    "model.vision.fullatt_block_indexes=0",
    "model.text.tie_word_embeddings=false",
    "synthetic.train_videos=2",
    "synthetic.eval_videos=1",
    "synthetic.num_frames=8",
    "synthetic.height=56",
    "synthetic.width=56",
]
TRAIN = ["--config", "tiny", "--save-every", "1", *OVERRIDES]
VIDEO_ARGS = [
    "--fps",
    "2",
    "--max-frames",
    "4",
    "--min-pixels",
    "784",
    "--max-pixels",
    "3136",
    "--dtype",
    "float32",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`nsa-jax train` for 2 steps, each saved (steps 1 and 2 in the run)."""
    out = tmp_path_factory.mktemp("walk") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nsa_jax.cli", "train", "--out", str(out), "--steps", "2", *TRAIN],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_train_export_eval_generate_and_convert_to_hf(run: Path, tmp_path: Path, capsys) -> None:
    step1, step2 = run / "checkpoints" / "1", run / "checkpoints" / "2"
    trained = read_step_params(step2)
    lazily = step_params(step2)
    assert_same_params({k: v.load() for k, v in lazily.items()}, trained)

    # export: the run is its latest step; a step directory is that step
    model, model1 = tmp_path / "model", tmp_path / "model1"
    assert cli.main(["export", str(run), "--out", str(model)]) == 0
    assert f"exported step 2 of the training run {run} -> {model}" in capsys.readouterr().out
    assert cli.main(["export", str(step1), "--out", str(model1)]) == 0
    assert exported_from(model) == {"run": str(run), "step": 2}
    assert exported_from(model1) == {"run": str(run), "step": 1}
    cfg, exported = read_params(resolve_ckpt(model))
    assert cfg == step_config(step2).model
    assert_same_params(exported, trained)
    first = read_step_params(step1)
    assert_same_params(read_params(resolve_ckpt(model1))[1], first)
    assert not np.array_equal(first["lm_head.kernel"], trained["lm_head.kernel"])  # trained
    assert (model / "hf_extra" / "tokenizer.json").read_bytes() == (
        run / "tokenizer.json"
    ).read_bytes()

    # the same export again is kept; another step over it is refused
    assert cli.main(["export", str(run), "--out", str(model)]) == 0
    assert "already exported" in capsys.readouterr().out
    assert cli.main(["export", str(run), "--out", str(model1)]) == 1
    assert f"it holds step 1 of {run}" in capsys.readouterr().err

    # jax-to-hf from the run: the HF directory holds step 2's tensors bit for bit
    hf = tmp_path / "hf"
    assert cli.main(["convert", "jax-to-hf", "--ckpt", str(run), "--out", str(hf)]) == 0
    capsys.readouterr()
    assert_same_params(read_params(resolve_ckpt(hf))[1], trained)
    assert (hf / "tokenizer.json").exists()

    # generate from the run and from the HF directory, eval from the export: one answer
    root = run / "synthetic" / "eval"
    sample = load_samples(get_task("needle"), root / "needle.jsonl", str(root))[0]
    ask = [
        "--video",
        sample.video,
        "--prompt",
        sample.prompt,
        "--max-new-tokens",
        str(sample.max_new_tokens),
        *VIDEO_ARGS,
    ]
    answers = []
    for ckpt in (run, hf):
        assert cli.main(["generate", "--ckpt", str(ckpt), *ask]) == 0
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] == answers[1] and len(answers[0]) > 8
    out = tmp_path / "eval"
    assert (
        cli.main(
            [
                "eval",
                "--ckpt",
                str(model),
                "--task",
                "needle",
                "--annotations",
                str(root / "needle.jsonl"),
                "--video-root",
                str(root),
                "--out",
                str(out),
                "--limit",
                "1",
                *VIDEO_ARGS,
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    (pred,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert pred["response"].strip() == answers[0]
    assert results["counts"]["scored"] == 1
    assert results["overall"] == 100 * pred["score"]


def test_a_run_starts_another_from_its_latest_step(run: Path, tmp_path: Path) -> None:
    """`init_from=RUN`: at learning rate 0 the new run's first step holds exactly the older
    run's latest parameters (and it trains with the older run's tokenizer)."""
    out = tmp_path / "again"
    argv = ["--out", str(out), "--steps", "1", *TRAIN, f"init_from={run}", "optim.lr=0"]
    proc = subprocess.run(
        [sys.executable, "-m", "nsa_jax.cli", "train", *argv],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_params(
        read_step_params(out / "checkpoints" / "1"), read_step_params(run / "checkpoints" / "2")
    )
    assert (out / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()

    other = load_config("tiny", [*OVERRIDES, "model.text.intermediate_size=96"]).model
    with pytest.raises(
        CkptError,
        match="parameter '.+' has shape .+, this config's model expects .+ such.; the run was",
    ):
        read_params(resolve_ckpt(run), other)


def test_an_export_is_replaced_only_by_the_demo_and_only_if_it_is_one(
    run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    assert export_model(run / "checkpoints" / "1", out)
    assert export_model(run, out, replace=True)  # the demo: a run trained further
    assert exported_from(out) == {"run": str(run), "step": 2}
    assert not export_model(run, out, replace=True)  # the same step: kept as it is
    assert_same_params(
        read_params(resolve_ckpt(out))[1], read_step_params(run / "checkpoints" / "2")
    )
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"--out {other}: not an empty directory; choose"):
        export_model(run, other, replace=True)
    assert os.listdir(other) == ["notes.txt"]


def test_a_run_with_no_saved_step_and_a_bare_step(run: Path, tmp_path: Path) -> None:
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CkptError, match="a training run with no saved step yet"):
        resolve_ckpt(tmp_path / "fresh")
    source = resolve_ckpt(run / "checkpoints" / "1")
    assert (source.kind, source.step, source.run) == ("step", 1, str(run))
    assert source.tokenizer_dir == str(run)
    alone = tmp_path / "copied_step"
    shutil.copytree(run / "checkpoints" / "1", alone, copy_function=os.link)
    with pytest.raises(CkptError, match=f"--ckpt {alone}: a training step outside its run; give"):
        resolve_ckpt(alone)
    assert resolve_ckpt(run).model_dir == str(run / "checkpoints" / "2")


def test_a_damaged_step_is_named_in_one_line_and_an_earlier_one_still_serves(
    run: Path, tmp_path: Path, capsys
) -> None:
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged, copy_function=os.link)  # links: no data copied
    files = [p for p in (damaged / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    with open(biggest, "rb") as f:
        head = f.read(1000)
    biggest.unlink()  # a new file, not the linked one of the fixture's run
    biggest.write_bytes(head)
    step2 = damaged / "checkpoints" / "2"

    argv = ["generate", "--ckpt", str(damaged), "--prompt", "?", "--dtype", "float32"]
    assert cli.main(argv) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"nsa-jax generate: error: checkpoint {step2} does not restore: ")
    for command in (["export", str(damaged)], ["convert", "jax-to-hf", "--ckpt", str(damaged)]):
        assert cli.main([*command, "--out", str(tmp_path / "out")]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert re.search(f"error: parameter '.+' of {step2} does not restore: ", line), line
        assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no temporary directory left behind

    step1 = damaged / "checkpoints" / "1"
    assert cli.main(["export", str(step1), "--out", str(tmp_path / "m")]) == 0
    assert_same_params(
        read_params(resolve_ckpt(tmp_path / "m"))[1], read_step_params(run / "checkpoints" / "1")
    )


@pytest.mark.parametrize("command", ["generate", "eval", "jax-to-hf", "export"])
@pytest.mark.parametrize("case", ["missing", "file", "other"])
def test_every_command_reports_a_bad_ckpt_in_one_line(command, case, tmp_path, capsys) -> None:
    path = tmp_path / "x"
    if case == "file":
        path.write_text("{}")
    elif case == "other":
        (path / "checkpoints_typo").mkdir(parents=True)
    argv = {
        "generate": ["generate", "--ckpt", str(path), "--prompt", "hi"],
        "eval": [
            "eval",
            "--ckpt",
            str(path),
            "--task",
            "jsonl",
            "--annotations",
            "a.jsonl",
            "--video-root",
            ".",
            "--out",
            str(tmp_path / "o"),
        ],
        "jax-to-hf": ["convert", "jax-to-hf", "--ckpt", str(path), "--out", str(tmp_path / "o")],
        "export": ["export", str(path), "--out", str(tmp_path / "o")],
    }[command]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    option = "RUN" if command == "export" else "--ckpt"
    expected = {
        "missing": f"{option} {path}: no such directory",
        "file": f"{option} {path}: a file, not a directory",
        "other": f"{option} {path}: not a run, step, exported model or HF directory; expected "
        "checkpoints/",
    }[case]
    assert len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "o").exists()


def test_training_keeps_the_tokenizer_it_was_given(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from nsa_jax.data.tokenizer import build_qwen_tokenizer

    given = tmp_path / "given" / "tokenizer.json"
    given.parent.mkdir()
    build_qwen_tokenizer().save(str(given))
    cfg = load_config("tiny", [f"tokenizer={given}"])
    out = tmp_path / "run"
    out.mkdir()
    tok = tokenizer_for(cfg, str(out))
    assert (out / "tokenizer.json").read_bytes() == given.read_bytes()
    assert tok.to_str() == Tokenizer.from_file(str(given)).to_str()
    assert os.listdir(out) == ["tokenizer.json"]
