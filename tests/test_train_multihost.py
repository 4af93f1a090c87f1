"""Multi-host training on one machine: 2 real processes with 4 CPU devices each
(`jax.distributed` on localhost, gloo collectives) train the tiny config on `data=2,fsdp=4`,
are killed after a checkpoint (or one of them is sent SIGTERM), resume with the same command,
and log, step for step, the losses of one process with 8 devices on the same mesh."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_resume import SMALL, committed, read_metrics
from test_train_step import subprocess_env

STEPS = 4  # killed after step 3 (checkpoint 2): the resumed pair runs 3 and 4 and saves 4
MESH = ["mesh=data=2,fsdp=4", "per_shard_batch=1"]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nsa_jax.cli", "train", "--config", "tiny", "--out", str(out),
            "--steps", str(STEPS), "--save-every", "2", *SMALL, *MESH, *extra]


# CPU collectives give up on a participant after 40 s by default; on a loaded 2-core machine
# running 8 device threads (and two processes' gloo collectives) a thread can wait longer than
# that for a core, which aborts a healthy run
PATIENT = ("--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
           "--xla_cpu_collective_timeout_seconds=1200")


def env_for(devices: int, cache: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(subprocess_env(devices), **cache, **extra)
    env["XLA_FLAGS"] += " " + PATIENT
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict[str, str]:
    """One persistent compilation cache for every run of the module."""
    path = tmp_path_factory.mktemp("jax_cache")
    return dict(JAX_COMPILATION_CACHE_DIR=str(path), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def start_pair(out: Path, cache: dict[str, str], *extra: str) -> list[subprocess.Popen]:
    """The same command as 2 processes of one run, 4 CPU devices each."""
    port = free_port()
    procs = []
    for pid in range(2):
        env = env_for(4, cache, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        log = open(out.parent / f"{out.name}.{pid}.log", "a")  # noqa: SIM115 - the child's
        procs.append(subprocess.Popen(command(out, *extra), env=env, stdout=log, stderr=log))
    return procs


def tail(out: Path) -> str:
    """The end of each process's log, without XLA's and gloo's chatter (the error last)."""
    noise = ("spmd_partitioner", "Involuntary", "[Gloo]", "WARNING", "I0000")
    parts = []
    for pid in range(2):
        lines = (out.parent / f"{out.name}.{pid}.log").read_text().splitlines()
        kept = [line for line in lines if not any(n in line for n in noise)]
        parts.append(f"--- process {pid}\n" + "\n".join(kept[-60:]))
    return "\n".join(parts)


def wait_all(procs: list[subprocess.Popen], out: Path, timeout: float, status: int = 0) -> None:
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.time()))
    assert all(p.returncode == status for p in procs), tail(out)


def assert_matches(out: Path, single: Path) -> None:
    """`out`'s metrics are, step for step, those of the one-process run."""
    want = {r["step"]: r for r in read_metrics(single)}
    got = read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # process 0 alone writes
    for r in got:  # gloo's all-reduce may add in another order than one process does
        assert math.isclose(r["loss"], want[r["step"]]["loss"], rel_tol=1e-5), (r, want)
        assert math.isclose(r["grad_norm"], want[r["step"]]["grad_norm"], rel_tol=1e-4)
        assert r["tokens"] == want[r["step"]]["tokens"]  # the same rows


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache) -> Path:
    """One process, 8 devices, the same mesh, uninterrupted."""
    out = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run(command(out), env=env_for(8, cache), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow  # 7-11 minutes on this project's 2-core machine (three runs; compiling dominates)
def test_two_processes_killed_and_resumed_match_one_process(single: Path, cache,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = (f"tokenizer={single / 'tokenizer.json'}",)  # the same vocabulary, not rebuilt
    procs = start_pair(out, cache, *extra)
    try:
        deadline = time.time() + 900
        while not (any(r["step"] >= 3 for r in read_metrics(out)) and committed(out)):
            assert all(p.poll() is None for p in procs), tail(out)
            assert time.time() < deadline, tail(out)
            time.sleep(0.05)
    finally:
        for p in procs:  # both hosts lost at once
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
    killed_at = max(r["step"] for r in read_metrics(out))
    assert killed_at < STEPS
    # every process wrote its own part of the checkpoint: its data iterator's position
    (step_dir,) = [p for p in sorted((out / "checkpoints").iterdir()) if p.name.isdigit()][-1:]
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data"))

    wait_all(start_pair(out, cache, *extra), out, 1200)
    log0 = (out.parent / "run.0.log").read_text()
    resumed = int(log0.split("resumed at step ")[1].split()[0])
    assert 2 <= resumed <= killed_at
    assert "nsa-jax train:" not in (out.parent / "run.1.log").read_text()  # process 0 reports

    assert_matches(out, single)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.slow  # about as long as the test above
def test_sigterm_to_one_host_stops_both_after_the_same_step(single: Path, cache,
                                                            tmp_path: Path) -> None:
    """Only process 1 is signalled; both agree on the step, save it together and exit 143;
    process 0 says so in one line. The pair then resumes there and matches one process."""
    out = tmp_path / "run"
    extra = (f"tokenizer={single / 'tokenizer.json'}",)
    procs = start_pair(out, cache, *extra)
    try:
        deadline = time.time() + 900
        while not read_metrics(out):
            assert all(p.poll() is None for p in procs), tail(out)
            assert time.time() < deadline, tail(out)
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)
        wait_all(procs, out, 900, status=128 + signal.SIGTERM)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    stopped = max(r["step"] for r in read_metrics(out))
    assert stopped < STEPS
    step_dir = out / "checkpoints" / str(stopped)
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(step_dir / "data"))
    log0 = (out.parent / "run.0.log").read_text()
    assert (f"nsa-jax train: stopped by SIGTERM after step {stopped}, saved in {step_dir}; the "
            "same command resumes from there") in log0
    assert "nsa-jax train:" not in (out.parent / "run.1.log").read_text()

    wait_all(start_pair(out, cache, *extra), out, 1200)
    assert f"resumed at step {stopped}" in (out.parent / "run.0.log").read_text()
    assert_matches(out, single)


def test_padded_vision_layouts_gather_and_scatter_the_same_patches() -> None:
    """`batch.pad_layout` (hosts agreeing on one layout shape): every patch goes out to a slot
    and comes back to its place as before widening, and the new slots read the zero row."""
    import numpy as np

    from nsa_jax.train.batch import model_batch, pad_layout, synthetic_batch
    from nsa_jax.train.config import load_config

    cfg = load_config("tiny")
    raw = synthetic_batch(cfg.model, 2, 192, answer_tokens=16, frame_patches=(8, 12))
    inputs = model_batch(raw, cfg.model).videos.inputs
    slots = raw["pixel_values_videos"].shape[1]
    x = np.random.default_rng(0).standard_normal((2, slots + 1))
    x[:, slots] = 0  # the zero row padding slots gather
    for layout in (inputs.window, inputs.frame):
        b, rows, longest = layout.gather.shape
        wide = pad_layout(layout, rows + 3, longest + 5)
        assert wide.gather.shape == (b, rows + 3, longest + 5)
        for lay in (layout, wide):
            slotted = np.take_along_axis(x, lay.gather.reshape(b, -1), 1)  # patches -> slots
            back = np.take_along_axis(slotted, lay.scatter, 1)  # slots -> patches
            if lay is layout:
                want = back
            np.testing.assert_array_equal(back, want)
        assert (wide.gather[:, rows:] == slots).all() and (wide.gather[:, :, longest:] == slots
                                                           ).all()
        assert (wide.lengths[:, rows:] == 1).all()


def test_finite_state_check() -> None:
    """`is_finite_state` (one program for the whole tree: see its docstring) finds a NaN or an
    infinity in any floating parameter and ignores integer ones."""
    import jax.numpy as jnp

    from nsa_jax.train.checkpoint import is_finite_state
    from nsa_jax.train.step import TrainState

    def state(bad: float) -> TrainState:
        params = {"a": jnp.ones((3, 2)), "b": jnp.zeros(4).at[2].set(bad),
                  "c": jnp.arange(3)}
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=zero, params=params, frozen={}, opt_state=(), skipped=zero,
                          bad_in_row=zero)

    assert is_finite_state(state(1.0))
    assert not is_finite_state(state(math.nan))
    assert not is_finite_state(state(-math.inf))


def test_eval_scores_the_batches_every_host_has() -> None:
    """`evaluate` stops at the first held-out batch a host lacks (agreed over hosts, here one)
    and weighs each batch by its answer tokens: two batches for `eval_batches=4` give the
    token-weighted mean of their losses."""
    import dataclasses

    import numpy as np

    from nsa_jax.train import sharding
    from nsa_jax.train.batch import model_batch, synthetic_batch
    from nsa_jax.train.config import load_config
    from nsa_jax.train.loop import evaluate
    from nsa_jax.train.step import Trainer

    cfg = dataclasses.replace(load_config("tiny", SMALL), eval_batches=4)
    trainer = Trainer.build(cfg, sharding.make_mesh("data=1"))
    state = trainer.init_state()
    raws = [synthetic_batch(cfg.model, 1, 128, answer_tokens=4 + 4 * i, frame_patches=(4, 4),
                            seed=i) for i in range(2)]
    batches = [model_batch(raw, cfg.model) for raw in raws]
    sums = [float(trainer.eval_loss(state.params, state.frozen, trainer.put_batch(b)))
            for b in batches]
    want = sum(sums) / sum(b.answer_tokens for b in batches)
    np.testing.assert_allclose(evaluate(trainer, state, raws, cfg), want, rtol=1e-6)
