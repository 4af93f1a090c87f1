"""The Mosaic GPU selected-attention forward (`selected_mgpu.py` beside this file) gives the
Triton forward's and the reference's `o` and `lse`.

On a CPU the kernel runs in jax's Mosaic GPU interpreter (simulated SMEM, TMA and barriers;
its wgmma products stand in as `dot_general`s, see `selected_mgpu._mma`) and lowers for CUDA
without a GPU; on a GPU (`-m gpu`, `JAX_PLATFORMS=cuda`) it is compiled. Not part of the
default test run (`testpaths = ["tests"]`); run it explicitly from the repository root:

    python -m pytest experiments/mgpu_selected                            # interpreted, lowered
    JAX_PLATFORMS=cuda python -m pytest experiments/mgpu_selected -m gpu  # compiled on a GPU
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.gpu.selected import SelParams, selected_forward

from selected_mgpu import selected_forward_mgpu

ON_GPU = jax.default_backend() == "gpu"
BS = 64


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_selection(rng: np.random.Generator, b: int, t: int, hkv: int, n: int) -> np.ndarray:
    """Distinct causal blocks per (token, KV head), some slots empty (-1)."""
    nb = t // BS
    cur = (np.arange(t) // BS)[None, :, None, None]
    score = rng.random((b, t, hkv, nb))
    score = np.where(np.arange(nb) <= cur, score, -1.0)
    score[..., 0] = 2.0  # the first block, as NSA forces it (every tile's union shares it)
    idx = np.argsort(-score, axis=-1)[..., :n].astype(np.int32)
    keep = (idx <= cur) & (rng.random(idx.shape) < 0.9)
    return np.where(keep, idx, -1)


def make_inputs(rng: np.random.Generator, t: int, hq: int, hkv: int, d: int, n: int):
    q = jnp.asarray(rng.standard_normal((1, t, hq, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, d)), jnp.bfloat16) for _ in range(2))
    seg = np.ones((1, t), np.int32)  # two packed samples and a padded tail
    seg[:, t // 2 + 5 :] = 2
    seg[:, t - 9 :] = 0
    return q, k, v, jnp.asarray(seg), jnp.asarray(random_selection(rng, 1, t, hkv, n))


def check(rng, *, t: int, hq: int, hkv: int, d: int, n: int, tokens: int, stages: int = 3,
          direct: bool | None = None, interpret: bool) -> None:
    q, k, v, seg, idx = make_inputs(rng, t, hq, hkv, d, n)
    scale = d**-0.5
    o, lse = selected_forward_mgpu(q, k, v, seg, idx, BS, scale, tokens, stages=stages,
                                   direct=direct, interpret=interpret)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == q.shape[:3]
    o_tr, lse_tr = selected_forward(q, k, v, seg, idx, SelParams(block=BS, scale=scale,
                                                                  interpret=interpret))
    cfg = ref.NSAConfig(block_size=BS, num_selected=n, window=0)
    with jax.default_matmul_precision("highest"):
        o_ref = ref.selected_attention(*(x.astype(jnp.float32) for x in (q, k, v)), idx, cfg,
                                       segment_ids=seg)
    o, lse, lse_tr = (np.asarray(x, np.float32) for x in (o, lse, lse_tr))
    assert np.isfinite(o).all()
    seen = np.isfinite(lse_tr)
    assert (np.isfinite(lse) == seen).all()  # -inf exactly where nothing is visible
    assert (~seen).any() and seen.mean() > 0.5
    np.testing.assert_allclose(lse[seen], lse_tr[seen], atol=2e-3, rtol=0)
    assert np.all(o[~seen] == 0)
    # both kernels round P to bf16 before P V; the f32 reference does not
    assert rel(o, o_tr) <= 5e-3, rel(o, o_tr)
    assert rel(o, o_ref) <= 1e-2, rel(o, o_ref)


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case; the GPU runs the compiled cases")
@pytest.mark.parametrize("hq,tokens", [(16, 4), (7, 8)])  # direct q/o rows; XLA-gathered rows
def test_interpreted_matches_triton_and_reference(rng, hq: int, tokens: int) -> None:
    check(rng, t=256, hq=hq, hkv=1, d=64, n=4, tokens=tokens, interpret=True)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="interpret-mode sweep; the GPU runs the compiled cases")
@pytest.mark.parametrize("t,hq,hkv,d,n,tokens,stages,direct", [
    (512, 32, 2, 128, 4, 4, 3, None),  # G = 16: 4 tokens x 16 heads = 64 rows, direct q/o
    (256, 32, 2, 128, 4, 4, 3, False),  # the same through the XLA gather / scatter
    (256, 16, 1, 64, 4, 2, 2, None),  # G = 16, 2 tokens: 32 rows (the rest never loaded)
    (512, 14, 2, 128, 4, 8, 3, None),  # G = 7: 8 x 7 = 56 of 64 rows (gathered)
    (256, 28, 4, 64, 4, 2, 2, None),  # G = 7, 2 tokens (14 rows), double buffering
    (256, 4, 4, 128, 8, 16, 4, None),  # G = 1: 16 tokens, long unions, 4 slots
])
def test_interpreted_sweep(rng, t, hq, hkv, d, n, tokens, stages, direct) -> None:
    check(rng, t=t, hq=hq, hkv=hkv, d=d, n=n, tokens=tokens, stages=stages, direct=direct,
          interpret=True)


@pytest.mark.parametrize("tokens,hq,direct", [(4, 64, True), (4, 64, False), (8, 28, False)])
def test_lowers_to_mosaic_gpu_without_a_gpu(tokens: int, hq: int, direct: bool) -> None:
    """The compiled path (wgmma, transposed K, layouts, TMA) lowers for CUDA on any machine."""
    t, hkv, d = 512, 4, 128
    q = jax.ShapeDtypeStruct((1, t, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, t, hkv, d), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
    idx = jax.ShapeDtypeStruct((1, t, hkv, 16), jnp.int32)
    f = jax.jit(functools.partial(selected_forward_mgpu, block=BS, scale=d**-0.5,
                                  tokens=tokens, direct=direct, interpret=False))
    text = f.trace(q, kv, kv, seg, idx).lower(lowering_platforms=("cuda",)).as_text()
    assert set(re.findall(r"stablehlo.custom_call @(\w+)", text)) == {"mosaic_gpu_v2"}
    assert "wgmma" in text


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda -m gpu)")
@pytest.mark.parametrize("hq,hkv,d,n,tokens,stages,direct", [
    (64, 4, 128, 16, 4, 3, None), (64, 4, 128, 16, 4, 2, False), (28, 4, 128, 32, 8, 3, None),
    (28, 4, 64, 8, 2, 2, None), (32, 2, 128, 16, 2, 3, None)])
def test_compiled_matches_triton_and_reference(rng, hq, hkv, d, n, tokens, stages,
                                               direct) -> None:
    check(rng, t=2048, hq=hq, hkv=hkv, d=d, n=n, tokens=tokens, stages=stages, direct=direct,
          interpret=False)
