"""Shared helpers for the Pallas TPU kernel tests (interpret mode on the CPU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# max |kernel - reference| <= TOL * max |reference| (+ a floor for all-zero references).
# bf16: the kernels round probabilities and dS to bf16 before the MXU and take delta from the
# bf16 output, as every flash kernel does, against an all-f32 reference; dk/dv, summed over
# many queries (up to 128-token blocks in the slow sweeps), then carry 1-1.6% rms error with
# outliers near 4% of the largest entry. RMS_TOL bounds the typical error so that the looser
# max cannot hide a systematic one.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 5e-2}
RMS_TOL = {jnp.float32: None, jnp.bfloat16: 2e-2}


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
    if RMS_TOL[dtype] is not None:
        rms = np.sqrt(((got - want) ** 2).mean()) / max(np.sqrt((want**2).mean()), 1e-3)
        assert rms <= RMS_TOL[dtype], f"{name}: rms relative err {rms:.3g}"


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


def assert_kernels_race_free(x) -> jax.Array:
    """Runs forward, dq and dk/dv of `x` (a `tokens.KernelInputs` whose `static.interpret`
    has `detect_races=True`) one kernel at a time, asserting the detector finds nothing in
    each (it resets per call). Returns the forward output in the kernel layout."""
    from pallas_kernels.tpu import block_sparse as bs
    from pallas_kernels.tpu import tpu_races_found

    m, st = x.meta, x.static
    kw = dict(scale=st.scale, spec=st.spec, interpret=st.interpret)
    lists = bs.FwdLists(m.kv_list, m.kv_count, st.num_u)
    o, lse = bs.sparse_fwd(x.q, m.q_seg, m.q_pos, m.idx_rows, x.k, x.v, m.k_seg, m.k_pos,
                           lists, **kw)
    jax.block_until_ready(o)
    assert not tpu_races_found(), "race in the forward kernel"
    do = jnp.asarray(np.random.default_rng(1).normal(size=o.shape), o.dtype)
    delta = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1, keepdims=True)
    args = (x.q, m.q_seg, m.q_pos, m.idx_rows, do, lse, delta, x.k, x.v, m.k_seg, m.k_pos)
    jax.block_until_ready(bs.sparse_dq(*args, lists, **kw))
    assert not tpu_races_found(), "race in the dq kernel"
    b, hkv, nq = x.q.shape[:3]
    dk, dv = bs.sparse_dkdv(*args, bs.pair_lists(lists, b, hkv, nq), **kw)
    jax.block_until_ready((dk, dv))
    assert not tpu_races_found(), "race in the dk/dv kernel"
    assert np.isfinite(np.asarray(dk, np.float32)).all()
    return o
