"""`experiments/nsa_probe.py`: the branch distributions it recomputes are those NSA uses (their
gate-weighted mix times V is the reference NSA output), so the sink and branch figures read
the real attention."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from pallas_kernels.reference import NSAConfig, nsa_reference  # noqa: E402

import nsa_probe  # noqa: E402


def test_branch_maps_reproduce_nsa_reference(rng: np.random.Generator) -> None:
    t, hq, hkv, d = 45, 4, 2, 8  # a partial last block, GQA group 2
    cfg = NSAConfig(block_size=8, num_selected=2, window=6)
    q = jnp.asarray(rng.standard_normal((1, t, hq, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, t, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, t, hkv, d)), jnp.float32)
    gates = jnp.asarray(rng.uniform(0.1, 0.9, (1, t, hq, 3)), jnp.float32)
    maps = nsa_probe.branch_maps(q, k, v, cfg)
    vh = np.repeat(np.asarray(v[0]), hq // hkv, axis=1)  # [T, Hq, D]
    mix = sum(np.asarray(gates[0, :, :, i, None])
              * np.einsum("ths,shd->thd", maps[name], vh)
              for i, name in enumerate(("cmp", "slc", "swa")))
    ref = np.asarray(nsa_reference(q, k, v, gates, cfg))[0]
    np.testing.assert_allclose(mix, ref, atol=2e-5)
    for name in ("dense", "slc", "swa"):  # distributions over visible tokens
        np.testing.assert_allclose(maps[name].sum(-1), 1.0, atol=1e-5)
        assert not np.triu(maps[name].transpose(1, 0, 2), 1).any()  # causal
    with jax.default_matmul_precision("highest"):
        dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.einsum("ths,shd->thd", maps["dense"], vh),
                               np.asarray(dense)[0], atol=2e-5)
