"""Shared test set-up: CPU only, f32 matmuls at full precision, fresh random inputs."""

import os
import zlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A NumPy generator seeded from the test's name: fresh per test, reproducible per name."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
