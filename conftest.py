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


# the files whose tests take minutes (a module fixture training on several meshes, real
# subprocesses killed and resumed) go first, so that under `-n 2 --dist loadfile` no worker is
# left alone with one of them at the end of the run
SLOWEST_FILES = ("test_train_step.py", "test_train_resume.py", "test_sequence_parallel.py",
                 "test_model_switches.py", "test_tpu_nsa.py", "test_ckpt.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A NumPy generator seeded from the test's name: fresh per test, reproducible per name."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
