"""Runs `pallas_kernels.tpu.nsa_attention` (interpret mode) under `jax.shard_map` over batch
rows and KV heads on 8 CPU devices, and unsharded, and writes both outputs and gradients
(`test_tpu_shard_map.py` runs this in a subprocess: the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/tpu_shard_check.py OUT.npz

Mesh `(data=2, heads=4)`: B = 2, Hkv = 4, Hq = 8, so each device runs one batch row and one
KV head with its two query heads, building its own block lists from its shard of the data.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from pallas_kernels import reference as ref
from pallas_kernels.tpu import (
    CompressedBlockSizes,
    NSABlockSizes,
    SelectedBlockSizes,
    WindowBlockSizes,
    nsa_attention,
)

B, T, HQ, HKV, D = 2, 40, 8, 4, 64
CFG = ref.NSAConfig(block_size=16, num_selected=2, window=12)
TILES = NSABlockSizes(
    CompressedBlockSizes(block_q=16, block_kv=16, select_chunk=2),
    SelectedBlockSizes(),
    WindowBlockSizes(block_q=16, block_kv=16),
)


def inputs() -> tuple[jax.Array, ...]:
    """Random q, k, v, gates, a loss weight `w` like the output, and packed segments whose
    second row ends in padding (segment 0)."""
    rng = np.random.default_rng(15)

    def n(*shape: int) -> jax.Array:
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    gates = jnp.asarray(rng.uniform(0.05, 0.95, size=(B, T, HQ, 3)), jnp.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, 20:] = 2
    seg[1, 25:], seg[1, 36:] = 2, 0
    return n(B, T, HQ, D), n(B, T, HKV, D), n(B, T, HKV, D), gates, n(B, T, HQ, D), jnp.asarray(seg)


def main(out: str) -> None:
    q, k, v, gates, w, seg = inputs()

    def attend(q, k, v, gates, seg):
        return nsa_attention(q, k, v, gates, CFG, segment_ids=seg, block_sizes=TILES)

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "heads"))
    rows = PartitionSpec("data", None, "heads", None)  # batch rows and (KV or query) heads
    sharded = jax.shard_map(
        attend, mesh=mesh, in_specs=(rows, rows, rows, rows, PartitionSpec("data")),
        # check_vma stays on: the kernels declare how their outputs vary over the mesh
        out_specs=rows,
    )  # fmt: skip
    results = {}
    for name, fn in (("one", attend), ("mesh", sharded)):

        def loss(q, k, v, gates, fn=fn):
            return (fn(q, k, v, gates, seg) * w).sum()

        o = jax.jit(lambda *a, fn=fn: fn(*a, seg))(q, k, v, gates)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gates)
        results[f"{name}_o"] = np.asarray(o)
        for g_name, g in zip(("dq", "dk", "dv", "dgates"), grads, strict=True):
            results[f"{name}_{g_name}"] = np.asarray(g)
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
