"""The train step on meshes of 8 CPU devices (2x4, 1x8, 8x1) and with the tokens sharded
(sequence=2) against one device, gradient accumulation's normalisation, NaN skipping, and a
restore onto another mesh.

The device count is fixed when JAX starts, so `train_mesh_check.py` runs in a subprocess with
`--xla_force_host_platform_device_count=8` and writes what is compared here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """The environment of a CPU JAX subprocess of this checkout (unoptimised XLA code: the
    programs are tiny and compiling dominates)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                        "--xla_backend_optimization_level=0")
    return env


def mesh_run(tmp: Path, meshes: str) -> dict:
    out = tmp / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "train_mesh_check.py"), str(out), str(tmp / "ck"),
         meshes],
        env=subprocess_env(8), capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    """One device, data=2 x fsdp=4, fsdp=8, sequence=2 and data=8, in one subprocess (one
    single-device reference for all of them; saved on 2x4, restored onto 8x1)."""
    return mesh_run(tmp_path_factory.mktemp("mesh"), "2x4,1x8,sequence=2,8x1")


def assert_same_losses(one: list[dict], other: list[dict]) -> None:
    assert len(one) == len(other) == 3
    for a, b in zip(one, other, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert len({r["loss"] for r in one}) == 3  # the parameters moved


def test_the_steps_fed_two_buckets(result: dict) -> None:
    """Every step function is traced at most once per bucket (the run fails otherwise,
    `chex.assert_max_traces`); the batches fed span two answer-slot buckets, so a retrace per
    step or per batch would show."""
    assert result["buckets"] == 2


@pytest.mark.parametrize("mesh", ["2x4", "1x8", "8x1"])
def test_data_and_fsdp_sharding_give_one_devices_losses(result: dict, mesh: str) -> None:
    assert_same_losses(result["meshes"]["1"], result["meshes"][mesh])


def test_training_steps_with_the_sequence_sharded_give_one_devices_losses(result: dict) -> None:
    """The tiny config (one hybrid layer, Hq=4, Hkv=2) with its tokens on sequence=2 (context
    parallelism, `test_sequence_parallel.py`): three steps give one device's losses and
    gradient norms."""
    assert "sequence" in result["input_ids"]["sequence=2"]  # the tokens are on token shards
    assert_same_losses(result["meshes"]["1"], result["meshes"]["sequence=2"])


def test_accumulated_loss_is_the_mean_over_all_answer_tokens(result: dict) -> None:
    acc = result["accumulated"]
    (a, b), (na, nb) = acc["alone"], acc["counts"]
    assert na != nb
    want = (a["loss"] * na + b["loss"] * nb) / (na + nb)
    assert acc["together"]["loss"] == pytest.approx(want, rel=1e-6)


def test_non_finite_steps_are_skipped_counted_and_leave_the_state(result: dict) -> None:
    nan = result["nan"]
    first, second, good = nan["records"]
    assert math.isnan(first["loss"]) and math.isnan(second["loss"])
    assert (first["skipped_steps"], first["bad_in_row"]) == (1, 1)
    assert (second["skipped_steps"], second["bad_in_row"]) == (2, 2)
    assert nan["params_unchanged"]
    # the next good step is exactly a fresh first step (the schedule counts applied updates)
    assert (good["skipped_steps"], good["bad_in_row"]) == (2, 0) and nan["good_equals_fresh"]


def test_a_state_saved_on_one_mesh_restores_onto_another(result: dict) -> None:
    """Saved on 2x4 (FSDP-sharded parameters), restored onto 8x1 (replicated, data parallel),
    one more step."""
    restored = result["restored"]
    assert restored["step"] == 2 and (restored["from"], restored["to"]) == ("2x4", "8x1")
    assert "fsdp" in restored["sharding_before"] and "fsdp" not in restored["sharding"]
    want = result["meshes"]["2x4"][2]
    assert restored["records"][0]["loss"] == pytest.approx(want["loss"], rel=2e-6)
