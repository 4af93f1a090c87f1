"""Shared test set-up for `tests/` and the tests kept beside experiments: CPU unless GPU tests
are asked for, f32 matmuls at full precision, little XLA optimisation on the CPU, fresh random
inputs."""

import os
import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config: pytest.Config) -> None:
    # the default run is the CPU's (CI has no accelerator; a GPU would change the numerics);
    # `-m gpu` runs on whatever accelerator JAX finds, and JAX_PLATFORMS always wins
    markexpr = config.option.markexpr or ""
    wants_gpu = "gpu" in markexpr and "not gpu" not in markexpr
    if not wants_gpu and "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    if not wants_gpu:
        # the suite's programs are small and mostly run once: XLA's backend optimisation (LLVM
        # at -O2 and its expensive passes) costs more than it saves, about a third of the CPU
        # time. `tests/test_tpu_compile.py` turns it back on for libtpu's real TPU programs.
        jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A NumPy generator seeded from the test's name: fresh per test, reproducible per name."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
