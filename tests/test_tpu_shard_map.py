"""`pallas_kernels.tpu.nsa_attention` under `jax.shard_map` over batch rows and KV heads
(8 CPU devices, interpret mode) equals the unsharded call, forward and gradients: each shard
builds its block lists from its own rows and heads, so context-parallel and head-parallel
layers can call the kernels per shard. The device count is fixed when JAX starts, so
`tpu_shard_check.py` runs in a subprocess (as `train_mesh_check.py` does). Slow: the TPU
interpreter runs every kernel twice (one device, then eight), about 2 CPU minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train_step import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_nsa_under_shard_map_equals_unsharded(tmp_path: Path) -> None:
    out = tmp_path / "shard.npz"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tpu_shard_check.py"), str(out)],
        env=subprocess_env(8), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = np.load(out)
    for name in ("o", "dq", "dk", "dv", "dgates"):
        one, mesh = res[f"one_{name}"], res[f"mesh_{name}"]
        assert np.isfinite(one).all() and np.abs(one).max() > 0, name  # a real comparison
        np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-6 * np.abs(one).max(),
                                   err_msg=name)  # fmt: skip
