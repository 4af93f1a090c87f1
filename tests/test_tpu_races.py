"""The race check used by every TPU kernel test can fail: a deliberately racy kernel is caught."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu import TPUInterpretParams, tpu_races_found


def _run(racy: bool) -> None:
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0

    x = jnp.ones((2, 8, 128), jnp.float32)
    # racy: both steps of a "parallel" axis (two simulated cores) write output block 0
    out_index = (lambda i: (0, 0, 0)) if racy else (lambda i: (i, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((None, 8, 128), out_index),
        out_shape=jax.ShapeDtypeStruct((2, 8, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=TPUInterpretParams(detect_races=True, num_cores_or_threads=2),
    )(x)
    jax.block_until_ready(out)


def test_racy_toy_kernel_is_caught():
    _run(racy=True)
    assert tpu_races_found()


def test_race_free_toy_kernel_passes():
    _run(racy=False)
    assert not tpu_races_found()
