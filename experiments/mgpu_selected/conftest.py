"""The set-up of `tests/conftest.py` for this prototype's tests, which run outside `tests/`:
CPU unless GPU tests are asked for, f32 matmuls at full precision, a fresh generator per test."""

import os
import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config: pytest.Config) -> None:
    markexpr = config.option.markexpr or ""
    wants_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    if not wants_gpu and "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A NumPy generator seeded from the test's name: fresh per test, reproducible per name."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
