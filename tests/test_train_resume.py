"""`nsa-jax train` end to end on the CPU: SIGINT and SIGTERM save the step and stop, exact
resume after them and after SIGKILL, atomic checkpoints (killed mid-save, steps past keeping),
checkpoints of another config or with an item missing, metrics files."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_step import ROOT, subprocess_env

from nsa_jax.train.checkpoint import CheckpointError, Checkpoints
from nsa_jax.train.config import load_config
from nsa_jax.train.step import TrainState

STEPS = 8
# the public command; one decoder layer and one vision block keep the compile short
SMALL = ["eval_every=0", "model.text.num_hidden_layers=1", "model.vision.depth=1",
         "model.vision.fullatt_block_indexes=0"]


def command(out: Path, *extra: str, save_every: int = 2) -> list[str]:
    return [sys.executable, "-m", "nsa_jax.cli", "train", "--config", "tiny", "--out", str(out),
            "--steps", str(STEPS), "--save-every", str(save_every), *SMALL, *extra]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """Subprocess environment sharing one persistent compilation cache: the later runs load
    the first run's programs instead of compiling them again."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(subprocess_env(), JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env) -> Path:
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    proc = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{STEPS}/{STEPS}" in proc.stderr  # the progress bar
    return out


def test_metrics_and_tensorboard(reference: Path) -> None:
    records = read_metrics(reference)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps"):
            assert key in r
        assert math.isfinite(r["loss"]) and r["tokens"] > 0 and r["skipped_steps"] == 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"])
        assert r["skipped_samples"] == 0 and r["skipped_by_reason"] == {}
    # a fresh model's logits are small, its predictions near uniform: the first step's loss
    # (a mean over answer tokens, not a sum) is ln(vocab) to within a fraction of a nat
    vocab = load_config("tiny", []).model.text.vocab_size
    assert records[0]["loss"] == pytest.approx(math.log(vocab), abs=0.25)
    assert records[0]["lr"] == 0.0 < records[1]["lr"]  # warm-up from zero
    assert len(list((reference / "tensorboard").iterdir())) == 1
    assert {"train/loss", "train/grad_norm", "train/tokens_per_s"} <= tensorboard_tags(reference)
    assert sorted(os.listdir(reference / "checkpoints")) == ["6", "8"]  # keep_last=2


def tensorboard_tags(out: Path) -> set[str]:
    """The scalar tags of a run's TensorBoard event files."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for events in (out / "tensorboard").iterdir():
        data = events.read_bytes()
        while data:  # TFRecord framing: length, crc, payload, crc
            n = int.from_bytes(data[:8], "little")
            event = event_pb2.Event.FromString(data[12 : 12 + n])
            tags.update(v.tag for v in event.summary.value)
            data = data[16 + n :]
    return tags


def test_skipped_samples_are_counted_where_users_look(reference: Path, env, tmp_path) -> None:
    """A missing video among the records: one warning line (above the progress bar, not
    again in the next epoch), and the count by cause in metrics.jsonl, TensorBoard and the
    final line."""
    videos = reference / "synthetic" / "train"
    good = (videos / "needle.jsonl").read_text().splitlines()[:3]
    missing = json.loads(good[0]) | {"video": str(tmp_path / "missing.mp4")}
    ann = tmp_path / "with_a_missing_video.jsonl"
    ann.write_text("\n".join([json.dumps(missing), *good]) + "\n")
    out = tmp_path / "run"
    # 3 steps of 2 rows: two epochs of the 3 good records, each in order after the bad one
    # (step 2's second row is the second epoch's first good record)
    proc = subprocess.run(
        [sys.executable, "-m", "nsa_jax.cli", "train", "--config", "tiny", "--out", str(out),
         "--steps", "3", *SMALL, "synthetic=none", f"annotations={ann}", "data.shuffle=false",
         f"data.video_roots={videos}", f"tokenizer={reference / 'tokenizer.json'}"],
        env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (warning,) = [x for x in proc.stderr.splitlines() if "skipping" in x]
    assert warning.split("skipping ", 1)[0] in ("", "WARNING:nsa_jax.data.stages:")  # own line
    assert warning.split("skipping ", 1)[1].startswith(
        f"{tmp_path}/missing.mp4 ({ann}:1): FileNotFoundError: ")
    records = read_metrics(out)
    assert [r["skipped_samples"] for r in records] == [1, 2, 2]
    assert records[-1]["skipped_by_reason"] == {"FileNotFoundError": 2}
    assert {"train/skipped_samples", "train/skipped_by_reason/FileNotFoundError"} <= (
        tensorboard_tags(out))
    assert proc.stdout.splitlines()[-1] == (
        f"done: step 3, loss {records[-1]['loss']:.4f}, 2 samples skipped "
        "(FileNotFoundError 2)")


def committed(out: Path) -> bool:
    """Whether `out` holds a finalised checkpoint (orbax names it by its step alone)."""
    ckpt = out / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def stop_after_a_step(cmd: list[str], env: dict[str, str], out: Path, start: int,
                      signum: signal.Signals) -> tuple[int, str]:
    """Runs `cmd`, sends `signum` once a step past `start` is logged; returns the exit status
    and stderr."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 900
        while not any(r["step"] > start for r in read_metrics(out)):
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, stderr


def test_sigint_sigterm_sigkill_and_a_damaged_step_then_the_same_command_resumes_exactly(
        reference: Path, env, tmp_path) -> None:
    """One run stopped three times, each time started again by the same command: Ctrl-C,
    then SIGTERM end the run after the step in flight with that step saved (no periodic save
    comes before the last step), one line and exit 128 + the signal; SIGKILL loses the steps
    since the last save. Then the newest step's state file is cut short (the issue's case):
    the fourth run says so in one line, keeps that step aside, resumes from the step before
    and finishes. Every step's loss and gradient norm is the uninterrupted run's, bit for
    bit."""
    out = tmp_path / "run"
    # the reference run's offline-built tokenizer: the same vocabulary, not built again
    cmd = command(out, f"tokenizer={reference / 'tokenizer.json'}", save_every=STEPS)
    saved = [0]
    for signum in (signal.SIGINT, signal.SIGTERM):
        status, stderr = stop_after_a_step(cmd, env, out, saved[-1], signum)
        assert status == 128 + signum, stderr[-4000:]
        stopped = max(r["step"] for r in read_metrics(out))
        assert saved[-1] < stopped < STEPS
        assert stderr.splitlines()[-1] == (
            f"nsa-jax train: stopped by {signum.name} after step {stopped}, saved in "
            f"{out}/checkpoints/{stopped}; the same command resumes from there")
        assert "Traceback" not in stderr
        assert str(stopped) in os.listdir(out / "checkpoints")
        saved.append(stopped)
    status, stderr = stop_after_a_step(cmd, env, out, saved[-1], signal.SIGKILL)
    assert status == -signal.SIGKILL, stderr[-4000:]
    assert saved[-1] < max(r["step"] for r in read_metrics(out)) < STEPS
    _, first, newest = saved
    truncate_state(out / "checkpoints" / str(newest))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Traceback" not in again.stderr
    where = out / "checkpoints"
    (line,) = [x for x in again.stderr.splitlines() if "does not restore" in x]
    assert line.startswith(f"checkpoint {where}/{newest} does not restore: ")
    assert f'"{where}/{newest}/state/"' in line  # the file
    assert line.endswith(f"kept aside as {where}/{newest}.damaged, resumed from step {first}")
    assert f"resumed at step {first}" in again.stderr
    assert f"{newest}.damaged" in os.listdir(where)
    want = {r["step"]: r for r in read_metrics(reference)}
    got = read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # no step logged twice
    for r in got:
        assert r["loss"] == want[r["step"]]["loss"], r["step"]  # bit-identical
        assert r["grad_norm"] == want[r["step"]]["grad_norm"], r["step"]


def test_steps_past_keeping_leave_no_partial_step(tmp_path, monkeypatch) -> None:
    """A step past keeping is renamed out of the step names before its files go: with the
    removal stopped after the rename (as by a process ended there), what is left lies in
    `.deleted/`, no step, and the next start empties it."""
    cfg = load_config("tiny", ["keep_last=1"])
    ckpt = Checkpoints(tmp_path, cfg)
    monkeypatch.setattr(Checkpoints, "_empty_deleted", lambda self: None)
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    for step in (1, 2):
        state = TrainState(step=jnp.int32(step), params={"w": jnp.full(3, float(step))},
                           frozen={}, opt_state={}, skipped=jnp.int32(0), bad_in_row=jnp.int32(0))
        ckpt.save(state, data, global_batch=2)
        ckpt.wait()
    ckpt.close()
    where = tmp_path / "checkpoints"
    assert sorted(os.listdir(where)) == [".deleted", "2"]
    assert os.listdir(where / ".deleted") == ["1"]
    shutil.rmtree(where / ".deleted" / "1" / "state")  # a removal cut short
    monkeypatch.undo()
    again = Checkpoints(tmp_path, cfg)
    assert again.all_steps() == [2] and sorted(os.listdir(where)) == ["2"]
    again.close()


@pytest.fixture
def saved(tmp_path) -> Path:
    """A run directory whose checkpoint (step 1) the tiny config wrote."""
    from train_save_kill import state_at

    ckpt = Checkpoints(tmp_path, load_config("tiny"))
    ckpt.save(state_at(1), iter(grain.MapDataset.range(3).to_iter_dataset()), global_batch=2)
    ckpt.wait()
    ckpt.close()
    return tmp_path


def test_checkpoint_of_another_config_is_refused(saved: Path) -> None:
    other = load_config("tiny", ["model.text.intermediate_size=96", "optim.lr=0.5",
                                 "steps=99", "mesh=fsdp=-1"])  # steps, mesh: may change
    with pytest.raises(CheckpointError) as info:
        Checkpoints(saved, other).check(1, 2)
    message = str(info.value)
    assert f"checkpoint {saved}/checkpoints/1 was written by another config" in message
    assert "model.text.intermediate_size: 128 -> 96" in message
    assert "optim.lr: 0.001 -> 0.5" in message
    assert "steps" not in message.split("(saved -> now):")[1] and "mesh" not in message


def test_checkpoint_with_an_item_missing_is_refused(saved: Path) -> None:
    shutil.rmtree(saved / "checkpoints" / "1" / "data")
    with pytest.raises(CheckpointError, match=rf"checkpoint {saved}/checkpoints/1 has no "
                                              r"'data' item \(found: config, meta, state\)"):
        Checkpoints(saved, load_config("tiny")).check(1, 2)


def test_the_command_exits_with_the_message(saved: Path) -> None:
    """Refused before the model or the data is built: no compilation, no tokenizer."""
    proc = subprocess.run([sys.executable, "-m", "nsa_jax.cli", "train", "--config", "tiny",
                           "--out", str(saved), "model.text.intermediate_size=96"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"nsa-jax train: checkpoint {saved}/checkpoints/1 was "
                                  "written by another config")
    assert not (saved / "synthetic").exists()


def test_resume_from_a_step_that_is_not_there_is_refused(saved: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nsa_jax.cli", "train", "--config", "tiny",
                           "--out", str(saved), "--resume-from", "7"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr == (f"nsa-jax train: --resume-from 7: {saved}/checkpoints has no step 7 "
                           "(steps: 1)\n")


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.3])
def test_a_save_killed_midway_never_restores_as_valid(tmp_path, delay: float) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_save_kill.py"),
                           str(tmp_path), str(delay)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    ckpt = Checkpoints(tmp_path, load_config("tiny"))
    steps = ckpt.all_steps()
    assert 1 in steps and set(steps) <= {1, 2}
    # what is left of the interrupted save is a temporary directory, never a step
    left = set(os.listdir(tmp_path / "checkpoints")) - {str(s) for s in steps}
    assert all(".orbax-checkpoint-tmp" in name for name in left), left
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def spec(shape: tuple[int, ...], dtype=jnp.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    from train_save_kill import SHAPE

    abstract = TrainState(step=spec((), jnp.int32), params={"w": spec(SHAPE), "b": spec((7,))},
                          frozen={}, opt_state={"m": spec(SHAPE)}, skipped=spec((), jnp.int32),
                          bad_in_row=spec((), jnp.int32))
    for step in steps:
        data = iter(grain.MapDataset.range(10).to_iter_dataset())
        state = ckpt.restore(step, abstract, data, global_batch=2)
        for leaf in jax.tree.leaves((state.params, state.opt_state)):
            np.testing.assert_array_equal(np.asarray(leaf), float(step))
        assert next(data) == step - 1  # the data iterator of that step
    # the next save (the resumed run's) clears the temporary directory away
    from train_save_kill import state_at

    ckpt.save(state_at(3), iter(grain.MapDataset.range(1).to_iter_dataset()), global_batch=2)
    ckpt.wait()
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
    with pytest.raises(CheckpointError, match="trained with 2 rows per micro-batch, this run "
                                              "has 4"):
        ckpt.restore(3, abstract, iter(grain.MapDataset.range(1).to_iter_dataset()),
                     global_batch=4)
    ckpt.close()


def state_of(step: int) -> TrainState:
    """A small state whose arrays (random, so that a truncated file cannot decompress) are
    told apart by `step`."""
    rng = np.random.default_rng(step)
    return TrainState(step=jnp.int32(step),
                      params={"w": jnp.asarray(rng.standard_normal((96, 64)), jnp.float32)},
                      frozen={}, opt_state={"m": jnp.asarray(rng.standard_normal(5), jnp.float32)},
                      skipped=jnp.int32(0), bad_in_row=jnp.int32(0))


def abstract_of(state: TrainState) -> TrainState:
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)


def steps_saved(directory: Path, steps: list[int]) -> Checkpoints:
    """Checkpoints of `steps` (`state_of`), each after `step` items of a data iterator."""
    ckpt = Checkpoints(directory, load_config("tiny", ["keep_last=9"]))
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    for step in steps:
        for _ in range(step - int(ckpt.latest_step() or 0)):
            next(data)
        ckpt.save(state_of(step), data, global_batch=2)
        ckpt.wait()
    return ckpt


def truncate_state(step_dir: Path) -> Path:
    """Cuts the largest file of a step's `state` item to half its length; returns it."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    return biggest


def test_a_damaged_newest_step_is_reported_kept_aside_and_the_one_before_resumed(
        tmp_path) -> None:
    ckpt = steps_saved(tmp_path, [1, 2, 3])
    where = tmp_path / "checkpoints"
    cut = truncate_state(where / "3")
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    steps = ckpt.resume_steps(2)
    assert steps == [3, 2, 1]
    state, step, (line,) = ckpt.restore_newest(steps, abstract_of(state_of(2)), data,
                                               global_batch=2)
    assert step == 2
    chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(state_of(2)))
    assert next(data) == 2  # the data iterator of step 2
    assert line.startswith(f"checkpoint {where}/3 does not restore: ")
    assert f'"{where}/3/state/"' in line and "\n" not in line  # the file, one line
    assert line.endswith(f"; kept aside as {where}/3.damaged, resumed from step 2")
    assert sorted(os.listdir(where)) == ["1", "2", "3.damaged"]
    assert (where / "3.damaged" / cut.relative_to(where / "3")).is_file()  # kept, not deleted
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_when_no_step_restores_nothing_is_set_aside(tmp_path) -> None:
    ckpt = steps_saved(tmp_path, [1, 2])
    for step in ("1", "2"):
        truncate_state(tmp_path / "checkpoints" / step)
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    with pytest.raises(CheckpointError, match=r"no checkpoint restores: checkpoint \S+/2 does "
                                              r"not restore: .*; checkpoint \S+/1 does not"):
        ckpt.restore_newest([2, 1], abstract_of(state_of(2)), data, global_batch=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    ckpt.close()


def test_resume_from_a_chosen_step_keeps_the_newer_ones_aside(tmp_path) -> None:
    ckpt = steps_saved(tmp_path, [1, 2, 3])
    with pytest.raises(CheckpointError, match=r"--resume-from 5: \S+ has no step 5 \(steps: "
                                              r"1, 2, 3\)"):
        ckpt.resume_steps(2, resume_from=5)
    steps = ckpt.resume_steps(2, resume_from=2)
    assert steps == [2]
    data = iter(grain.MapDataset.range(100).to_iter_dataset())
    state, step, reports = ckpt.restore_newest(steps, abstract_of(state_of(2)), data,
                                               global_batch=2)
    assert step == 2 and int(state.step) == 2 and reports == []
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2", "3.newer-than-2"]
    ckpt.close()


@pytest.mark.slow
def test_non_finite_steps_in_a_row_stop_the_run(reference: Path, env, tmp_path) -> None:
    """A learning rate that blows the parameters up: every later step is non-finite, skipped
    and counted; two in a row stop the run, and nothing after them is saved."""
    out = tmp_path / "nan"
    proc = subprocess.run(command(out, "optim.lr=1e30", "max_bad_steps=2",
                                  f"tokenizer={reference / 'tokenizer.json'}"),
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 1
    assert "2 steps in a row with a non-finite loss or gradient" in proc.stderr
    records = read_metrics(out)
    assert [r["loss"] is None for r in records] == [False, False, True, True]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2]
    assert sorted(os.listdir(out / "checkpoints")) == ["2"]


def test_keeps_the_last_and_the_best(tmp_path) -> None:
    """keep_last=1, keep_best=1: the latest step and the one with the lowest eval loss."""
    cfg = load_config("tiny", ["keep_last=1", "keep_best=1"])
    ckpt = Checkpoints(tmp_path, cfg)
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    for step, eval_loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None)]:
        state = TrainState(step=jnp.int32(step), params={"w": jnp.zeros(3)}, frozen={},
                           opt_state={}, skipped=jnp.int32(0), bad_in_row=jnp.int32(0))
        ckpt.save(state, data, global_batch=2, eval_loss=eval_loss)
        ckpt.wait()
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def test_late_read_errors_of_a_failed_restore_stay_off_stderr(monkeypatch, caplog) -> None:
    """After a failed restore, a read that ends later on orbax's closed event loop (the thread
    pool's done-callback raising `Event loop is closed`) is not logged; any other error of a
    done-callback still is."""
    from concurrent.futures import Future

    from nsa_jax.train import checkpoint

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    pool_log = logging.getLogger("concurrent.futures")
    monkeypatch.setattr(pool_log, "filters", list(pool_log.filters))
    checkpoint.quiet_late_read_errors()

    def finish_with(error: Exception) -> None:
        def callback(_: Future) -> None:
            raise error

        f = Future()
        f.add_done_callback(callback)
        f.set_result(None)

    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        finish_with(RuntimeError("Event loop is closed"))
        assert caplog.records == []
        finish_with(ValueError("a bug"))
    (record,) = caplog.records
    assert record.exc_info[1].args == ("a bug",)
