"""The Pallas GPU kernel for gathered query rows (`pallas_kernels.gpu.banded_rows`, which
`nsa_jax.attention.dense.dense_rows` runs on a GPU) gives dense causal attention's outputs and
gradients.

A row at position `p` in segment `s > 0` sees every key at or before `p` in segment `s`; an
unused slot (`rows = -1`) and a row on a padding token see nothing and return zeros, with zero
gradient. On a CPU the kernel runs in Pallas interpret mode against the masked softmax written
out and against `chunked_attention` (the XLA path that CPU and TPU keep); on a GPU it is
compiled by the Triton lowering (`-m gpu`, `JAX_PLATFORMS=cuda`).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.attention.dense import (
    banded_dense_rows,
    chunked_attention,
    default_implementation,
    dense_band,
    dense_rows,
)
from nsa_jax.attention.hybrid import count_text_rows, text_attention, text_row_bucket
from pallas_kernels.gpu.banded import key_tile_ranges, query_tile_ranges

ON_GPU = jax.default_backend() == "gpu"


def packed_rows(rng: np.random.Generator, t: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """`(seg, rows) [2, T], [2, slots]` int32. Batch row 0: two packed samples and a padded
    tail, `slots - 10` rows (the first token, the last, a padding one, and the others at sorted
    random positions); row 1: one sample, `2 * slots // 3` rows. Unused slots are -1."""
    seg = np.ones((2, t), np.int32)
    seg[0] = np.repeat([1, 2, 0], [t // 2 + 5, t // 2 - 21, 16])
    rows = np.full((2, slots), -1, np.int32)
    n0, n1 = slots - 10, 2 * slots // 3
    inner = np.sort(rng.choice(np.arange(1, t - 1), n0 - 2, replace=False))
    rows[0, :n0] = [0, *inner, t - 1]
    rows[1, :n1] = np.sort(rng.choice(t, n1, replace=False))
    return seg, rows


def row_inputs(rng: np.random.Generator, t: int, slots: int, hq: int, hkv: int, d: int,
               dtype=jnp.float32):
    """Random `q_rows [2, slots, Hq, D]`, `k, v [2, T, Hkv, D]`, a cotangent like `q_rows`, and
    `packed_rows`' layout."""
    seg, rows = packed_rows(rng, t, slots)
    q, ct = (jnp.asarray(rng.standard_normal((2, slots, hq, d)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, t, hkv, d)), dtype) for _ in range(2))
    return q, k, v, ct, jnp.asarray(seg), jnp.asarray(rows)


def positions(rows: jax.Array, seg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(q_pos, q_seg)` of the rows: unused slots at position 0 in segment 0."""
    live = rows >= 0
    q_pos = jnp.where(live, rows, 0)
    return q_pos, jnp.where(live, jnp.take_along_axis(seg, q_pos, axis=1), 0)


def masked_softmax(q, k, v, rows, seg):
    """The rule written out: softmax over a `[B, R, T]` visibility mask, zeros where a row
    sees nothing."""
    q_pos, q_seg = positions(rows, seg)
    t = k.shape[1]
    mask = ((jnp.arange(t)[None, None] <= q_pos[:, :, None])
            & (seg[:, None, :] == q_seg[:, :, None]) & (q_seg[:, :, None] > 0))
    o = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    return jnp.where(mask.any(-1)[:, :, None, None], o, 0.0)


def out_and_grads(fn, q, k, v, ct) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`(o, (dq, dk, dv))`: `fn(q, k, v)` and its VJP with the cotangent `ct`, in one jit (one
    compilation instead of many small eager ones, which dominate interpret mode)."""
    def run(q, k, v):
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(ct.astype(o.dtype))

    return jax.jit(run)(q, k, v)


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case; the GPU runs the compiled case")
@pytest.mark.parametrize("hq,hkv", [(2, 2), (7, 1)], ids=["g1", "g7"])
def test_interpreted_kernel_equals_the_masked_softmax_and_chunked_attention(rng, hq: int,
                                                                           hkv: int) -> None:
    """Tiles of 16 rows and 16 / 32 keys: 90 slots (not a multiple of the tile) over 320
    keys, so each query tile walks masked, whole and skipped key tiles, and each key tile the
    query tiles from the first that reaches it."""
    t, slots, d = 320, 90, 32
    q, k, v, ct, seg, rows = row_inputs(rng, t, slots, hq, hkv, d)
    tiles = dataclasses.replace(dense_band(d), block_q=16, block_k=16, block_q_bwd=16,
                                block_k_bwd=32)
    q_pos, q_seg = positions(rows, seg)
    padded = [jnp.pad(x, ((0, 0), (0, 96 - slots))) for x in (q_pos, q_seg)]
    lo, hi, a, b = key_tile_ranges(*padded, seg, tiles, 16, 16)
    assert (lo > 0).any() and (hi < t // 16).any() and (b > a).any() and (a > lo).any()
    lo, hi, a, b = query_tile_ranges(*padded, seg, tiles, 16, 32)
    assert (lo > 0).any() and (b > a).any()

    def ours(q, k, v):
        return banded_dense_rows(q, q_pos, q_seg, k, v, seg, tiles)

    def chunked(q, k, v):
        return chunked_attention(q, k, v, q_pos, q_seg, seg, 64)

    o, got = out_and_grads(ours, q, k, v, ct)
    unused = np.asarray(rows) < 0
    padding = np.asarray(q_seg) == 0
    assert unused.any() and (padding & ~unused).any()
    assert not np.asarray(o)[padding].any() and not np.asarray(got[0])[padding].any()
    for want_fn in (lambda *a: masked_softmax(*a, rows, seg), chunked):
        want, want_grads = out_and_grads(want_fn, q, k, v, ct)
        np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
        for name, a, w in zip(("dq", "dk", "dv"), got, want_grads, strict=True):
            np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case; the GPU runs the compiled case")
def test_text_attention_routes_pallas_gpu_and_chunked_to_the_same_numbers(rng) -> None:
    """`text_attention` (gather, `dense_rows`, scatter) with the kernel's default tiles,
    interpreted, against the chunked path; text rows in a 64-slot bucket over 200 tokens."""
    t, hq, hkv, d = 200, 4, 2, 16
    seg = jnp.asarray(np.repeat([[1, 2, 0]], [90, 100, 10], axis=1))
    is_text = jnp.asarray(rng.random((1, t)) < 0.2)
    rows = text_row_bucket(count_text_rows(np.asarray(is_text)), t)
    q, ct = (jnp.asarray(rng.standard_normal((1, t, hq, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, d)), jnp.float32) for _ in range(2))

    def run(implementation: str):
        return lambda q, k, v: text_attention(q, k, v, is_text, rows, seg, implementation)

    o, got = out_and_grads(run("pallas_gpu"), q, k, v, ct)
    want, want_grads = out_and_grads(run("chunked"), q, k, v, ct)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
    for a, w in zip(got, want_grads, strict=True):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)


def test_dense_rows_runs_the_pallas_kernel_on_gpu_only(monkeypatch) -> None:
    assert default_implementation(jnp.bfloat16, None, gathered=True) == (
        "pallas_gpu" if ON_GPU else "chunked")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert default_implementation(jnp.bfloat16, None, gathered=True) == "pallas_gpu"
    assert default_implementation(jnp.bfloat16, None) == "cudnn"  # whole sequences only
    x = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(ValueError, match="implementation"):
        dense_rows(x, jnp.zeros((1, 16), jnp.int32), x, x, implementation="cudnn")


def test_row_kernels_lower_to_triton_without_a_gpu() -> None:
    """Forward and backward at the Qwen shape (28 / 4 heads, D 128, bf16, default tiles) lower
    for CUDA on any machine: three Triton calls."""
    r, t, hq, hkv, d = 200, 1000, 28, 4, 128
    q = jax.ShapeDtypeStruct((1, r, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((1, r), jnp.int32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    p = dataclasses.replace(dense_band(d), interpret=False)

    def loss(q, k, v, q_pos, q_seg, seg):
        o = banded_dense_rows(q, q_pos, q_seg, k, v, seg, p)
        return o.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    text = grad.trace(q, kv, kv, rows, rows, seg).lower(lowering_platforms=("cuda",)).as_text()
    kernels = set(re.findall(r'name = "(nsa_[a-z_]+)"', text))
    assert kernels == {"nsa_banded_fwd", "nsa_banded_dq", "nsa_banded_dkv"}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda -m gpu)")
@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float32, 1e-4)],
                         ids=["bf16", "f32"])
def test_compiled_kernel_matches_chunked_attention(rng, dtype, tol: float) -> None:
    """`dense_rows` on the GPU (the compiled kernel, default tiles) against `chunked_attention`
    on the same inputs in f32: 28 / 4 heads, D 128, 4096 keys, 200 slots."""
    t, slots, hq, hkv, d = 4096, 200, 28, 4, 128
    q, k, v, ct, seg, rows = row_inputs(rng, t, slots, hq, hkv, d, dtype)
    q_pos, q_seg = positions(rows, seg)

    def ours(q, k, v):
        return dense_rows(q, rows, k, v, seg)

    def chunked(q, k, v):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return chunked_attention(*f32, q_pos, q_seg, seg)

    o, got = out_and_grads(ours, q, k, v, ct)
    want, want_grads = out_and_grads(chunked, q, k, v, ct)
    assert o.dtype == dtype
    assert rel(o, want) <= tol
    for name, a, w in zip(("dq", "dk", "dv"), got, want_grads, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert rel(a, w) <= tol, (name, rel(a, w))
