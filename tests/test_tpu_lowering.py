"""Every TPU kernel lowers to Mosaic for a TPU target, forward and backward, without a TPU.

The interpreter runs the kernels' semantics; this checks that Pallas accepts the block shapes,
index maps and ops for the Mosaic backend (`lowering_platforms=("tpu",)`), in seconds and
without libtpu. Compiling them needs no chip either: `test_tpu_compile.py` runs libtpu's own
compiler (XLA:TPU and Mosaic) on this host for v5e, v5p and v6e slices, which also checks that
they fit the chip (SMEM, VMEM, HBM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.tpu import nsa_attention


def _lower(dtype, hq, hkv, d, t, cfg) -> str:
    q = jax.ShapeDtypeStruct((1, t, hq, d), dtype)
    k = jax.ShapeDtypeStruct((1, t, hkv, d), dtype)
    gates = jax.ShapeDtypeStruct((1, t, hq, 3), dtype)

    def loss(*a):
        return nsa_attention(*a, cfg, interpret=False).astype(jnp.float32).sum()

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))
    return jax.jit(grads).trace(q, k, k, gates).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize(
    "dtype, hq, hkv, d, t, cfg",
    [
        (jnp.bfloat16, 28, 4, 128, 1000, ref.NSAConfig()),  # Qwen2.5-VL-7B, VideoNSA setting
        pytest.param(jnp.float32, 2, 2, 40, 130, ref.NSAConfig(
            block_size=24, compress_block=24, compress_stride=8, num_selected=5, window=33,
            videonsa_compat=True), marks=pytest.mark.slow),
        pytest.param(jnp.bfloat16, 16, 1, 64, 77,
                     ref.NSAConfig(block_size=16, num_selected=3, window=20),
                     marks=pytest.mark.slow),
        pytest.param(jnp.float32, 7, 1, 96, 700,
                     ref.NSAConfig(block_size=128, num_selected=4, window=512),
                     marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_nsa_lowers_for_tpu(dtype, hq, hkv, d, t, cfg):
    text = _lower(dtype, hq, hkv, d, t, cfg)
    # forward: compressed, importance, selected, window; backward: dq and dk/dv of three
    assert text.count("tpu_custom_call") == 10
