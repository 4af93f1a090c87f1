"""The TPU kernels compile for real TPU chips: libtpu's compiler (XLA:TPU and Mosaic) runs on
this CPU host for a described slice (`pallas_kernels.tpu.aot`), and rejects what would not fit
a chip: block lists past SMEM, tiles past VMEM, buffers past HBM. The interpret-mode tests
check the kernels' numbers; these check that they fit. The default run compiles the selected
branch's kernels, forward and backward, just past 8K tokens on v5e (at 8K, before the lists
were split, the selected kernel's scalar prefetch overflowed SMEM): about 50 CPU seconds,
against two CPU minutes for the whole NSA at 16K, which `-m slow` compiles (libtpu's compile
time hardly depends on T or the head count: it is per kernel, per fusion and per XLA sort).
`-m slow` adds a program sharded over a 2x2 mesh and the whole sweep of `aot.sweep_cases`
(a covering design: every axis value of the issue on every generation at 128K tokens forward and
backward, the 256K forward and the 8K/32K ladder; 42 programs, hours on a small host). Its
figures are in `experiments/results/tpu_compile/tpu_compile.json` (written by
`experiments/tpu_compile.py`, which compiles the same cases), tabulated in `docs/tpu_roofline.md`.
"""

from __future__ import annotations

import os

import jax
import pytest

from pallas_kernels.tpu import aot

pytestmark = pytest.mark.skipif(aot.libtpu_missing() is not None, reason=str(aot.libtpu_missing()))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another compiling process


@pytest.fixture(autouse=True)
def tpu_optimisations():
    """libtpu compiles as a TPU run would: the CPU programs' `jax_disable_most_optimizations`
    (conftest.py) is off while these compile."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def _check(gen: str, case: aot.NSACase) -> aot.CompileStats:
    st = aot.compile_case(case, gen)
    assert st.hbm_bytes <= aot.HBM_BYTES[gen], (case.name, st.hbm_bytes)
    return st


def test_selected_kernels_compile_past_8k_on_v5e():
    """Forward and backward of the selected branch (its block lists, the longest, were what
    overflowed SMEM) at the Qwen2.5-VL-7B shape (28/4 heads, D 128) and 8K + 2 blocks."""
    st = _check("v5e", aot.NSACase(8192 + 128, branch="selected"))
    assert st.flops and st.flops > 0  # the Pallas calls report their cost estimates


@pytest.mark.slow
def test_nsa_compiles_past_8k_on_v5e():
    """Forward and backward of the whole NSA (every branch's kernels) of the Qwen2.5-VL-7B
    shape at 16K tokens."""
    st = _check("v5e", aot.NSACase(16384))
    assert st.flops and st.flops > 0


@pytest.mark.slow
def test_sharded_nsa_compiles():
    """Under `shard_map` over batch rows and KV heads (2 x 2 chips): lists built per shard."""
    _check("v5e", aot.NSACase(2048, b=2, mesh=2))


@pytest.mark.slow
@pytest.mark.parametrize("gen, case", aot.sweep_cases(), ids=lambda x: getattr(x, "name", x))
def test_sweep_compiles(gen, case):
    _check(gen, case)
