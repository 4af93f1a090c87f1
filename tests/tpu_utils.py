"""Shared helpers for the Pallas TPU kernel tests (interpret mode on the CPU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# max |kernel - reference| <= TOL * max |reference| (+ a floor for all-zero references)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def qkv(rng: np.random.Generator, b: int, t: int, hq: int, hkv: int, d: int, dtype):
    """Random q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]` in `dtype`."""
    def n(*s):
        return jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)

    return n(b, t, hq, d), n(b, t, hkv, d), n(b, t, hkv, d)


def packed_segments(rng: np.random.Generator, b: int, t: int) -> jax.Array:
    """`[B, T]` segment ids: 2-3 samples of random lengths, then padding (0) at the end."""
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(4, t - 2), size=2, replace=False))
        row = np.ones(t, np.int32)
        row[cuts[0] :] = 2
        row[cuts[1] :] = 3 if rng.random() < 0.5 else 0
        row[t - 2 :] = 0
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def assert_close(got: jax.Array, want: jax.Array, dtype, name: str) -> None:
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    err = np.abs(got - want).max()
    scale = max(np.abs(want).max(), 1e-3)
    assert err <= TOL[dtype] * scale, f"{name}: max err {err:.3g} vs scale {scale:.3g}"


def check_fwd_and_grads(
    fn: Callable[..., jax.Array],
    ref: Callable[..., jax.Array],
    args: Sequence[jax.Array],
    dtype,
    names: Sequence[str],
    seed: int = 0,
) -> None:
    """Output and the gradients of `sum(out * w)` w.r.t. every arg agree with the reference."""
    out, vjp = jax.vjp(fn, *args)
    out_ref, vjp_ref = jax.vjp(ref, *args)
    assert out.dtype == out_ref.dtype
    assert_close(out, out_ref, dtype, "out")
    w = jnp.asarray(np.random.default_rng(seed).normal(size=out.shape), out.dtype)
    for name, g, g_ref in zip(names, vjp(w), vjp_ref(w), strict=True):
        assert_close(g, g_ref, dtype, f"d{name}")
