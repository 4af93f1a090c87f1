"""The TPU kernels under `shard_map` over batch rows and KV heads (interpret mode, 4 forced
CPU devices in a child process): each shard builds its own block lists from its own rows and
heads, so the sharded outputs and gradients equal the unsharded ones. (The compiled form of the
same program on a v5e 2x2 slice is `test_tpu_compile.test_sharded_nsa_compiles`.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from pallas_kernels import reference as ref
    from pallas_kernels.tpu import nsa_attention

    cfg = ref.NSAConfig(block_size=16, num_selected=2, window=20)
    b, t, hq, hkv, d = 2, 40, 4, 2, 64
    rng = np.random.default_rng(0)
    def n(*s):
        return jnp.asarray(rng.normal(size=s), jnp.float32)
    q, k, v = n(b, t, hq, d), n(b, t, hkv, d), n(b, t, hkv, d)
    gates = jnp.asarray(rng.uniform(0.1, 0.9, size=(b, t, hq, 3)), jnp.float32)
    seg = jnp.asarray(np.r_[[1] * 25 + [2] * 13 + [0] * 2, [1] * 40].reshape(2, t), jnp.int32)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "heads"))
    heads = P("data", None, "heads", None)

    def loss(f):
        return lambda q, k, v, g, s: f(q, k, v, g, s).sum()

    def nsa(q, k, v, g, s):
        return nsa_attention(q, k, v, g, cfg, segment_ids=s)

    sharded = jax.shard_map(nsa, mesh=mesh, in_specs=(heads, heads, heads, heads, P("data")),
                            out_specs=heads, check_vma=False)
    args = (q, k, v, gates, seg)
    o1, g1 = jax.value_and_grad(loss(sharded), argnums=(0, 1, 2, 3))(*args)
    o2, g2 = jax.value_and_grad(loss(nsa), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(sharded(*args), nsa(*args), rtol=1e-5, atol=1e-5)
    for a, w in zip(g1, g2):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)
    print("SHARDED_OK")
    """
)


def test_nsa_under_shard_map_matches_unsharded():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=1200)  # fmt: skip
    assert "SHARDED_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
