"""Whole NSA through `nsa_attention(implementation="pallas_tpu")` (interpret mode) against the
reference: outputs and the gradients of q, k, v, gates (and the compression MLP)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.attention import AttentionConfig
from nsa_jax.attention import nsa as dispatch
from pallas_kernels import reference as ref
from pallas_kernels.numerics import cdiv
from pallas_kernels.tpu import (
    CompressedBlockSizes,
    NSABlockSizes,
    SelectedBlockSizes,
    WindowBlockSizes,
    nsa_attention,
)
from pallas_kernels.tpu import block_sparse as bs
from tests import tpu_utils as tu


def _gates(rng, b, t, hq, dtype):
    return jnp.asarray(rng.uniform(0.05, 0.95, size=(b, t, hq, 3)), jnp.float32).astype(dtype)


def test_pallas_tpu_implementation_matches_reference(rng):
    """The public entry point with default tiles: f32, GQA 7, packed segments, T off the grid,
    more blocks than selected (top-n decides), window across blocks."""
    cfg = ref.NSAConfig(block_size=16, num_selected=3, window=20)
    b, t, hq, hkv, d = 1, 77, 7, 1, 64
    q, k, v = tu.qkv(rng, b, t, hq, hkv, d, jnp.float32)
    gates = _gates(rng, b, t, hq, jnp.float32)
    seg = tu.packed_segments(rng, b, t)

    def fn(q, k, v, gates):
        return dispatch.nsa_attention(
            q, k, v, gates, cfg, segment_ids=seg, implementation="pallas_tpu"
        )

    def want(q, k, v, gates):
        return ref.nsa_reference(q, k, v, gates, cfg, segment_ids=seg)

    tu.check_fwd_and_grads(fn, want, (q, k, v, gates), jnp.float32, ["q", "k", "v", "gates"])


SMALL = NSABlockSizes(
    CompressedBlockSizes(block_q=16, block_kv=16, select_chunk=2),
    SelectedBlockSizes(block_q=16),
    WindowBlockSizes(block_q=16, block_kv=32),
)


@pytest.mark.parametrize(
    "dtype, hq, hkv, d, cfg",
    [
        # bf16, GQA 16, MLP compression: n covers all 5 blocks, so bf16 rounding of the
        # importance scores cannot change the selected set (only the order, which is moot)
        (jnp.bfloat16, 16, 1, 128,
         ref.NSAConfig(block_size=16, num_selected=5, window=9, compression="mlp")),
        # f32, GQA 1, head dim padded, VideoNSA's reversed compressed rule and top-n (each
        # piece is in the default suite branch by branch)
        pytest.param(jnp.float32, 2, 2, 40, ref.NSAConfig(block_size=16, num_selected=2,
                     window=33, videonsa_compat=True), marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_nsa_matches_reference(rng, dtype, hq, hkv, d, cfg):
    b, t = 1, 70
    q, k, v = tu.qkv(rng, b, t, hq, hkv, d, dtype)
    gates = _gates(rng, b, t, hq, dtype)
    seg = tu.packed_segments(rng, b, t)
    params = None
    if cfg.compression == "mlp":
        params = ref.init_compress_params(jax.random.key(int(rng.integers(1 << 30))), cfg, d)

    def with_w1(f):
        def g(q, k, v, gates, w1):
            p = None if params is None else {**params, "k_w1": w1}
            return f(q, k, v, gates, cfg, segment_ids=seg, compress_params=p)

        return g

    w1 = params["k_w1"] if params else jnp.zeros(())
    fn = with_w1(lambda *a, **kw: nsa_attention(*a, **kw, block_sizes=SMALL))
    tu.check_fwd_and_grads(fn, with_w1(ref.nsa_reference), (q, k, v, gates, w1), dtype,
                           ["q", "k", "v", "gates", "k_w1"])  # fmt: skip


def test_auto_picks_pallas_on_tpu():
    assert dispatch.AUTO["tpu"] == "pallas_tpu"
    # the TPU kernel, wrapped to run per shard under a mesh (`attention.partition`)
    attn = AttentionConfig(implementation="pallas_tpu")
    kernel = dispatch.resolve_implementation(attn).__wrapped__  # at the config's tile sizes
    assert kernel.func is nsa_attention and kernel.keywords == {"block_sizes": attn.tpu_blocks}


def test_zero_window_and_short_sequences(rng):
    """No window branch and a sequence shorter than one compressed block (nothing visible)."""
    cfg = ref.NSAConfig(block_size=16, num_selected=2, window=0)
    q, k, v = tu.qkv(rng, 1, 11, 2, 1, 64, jnp.float32)
    gates = _gates(rng, 1, 11, 2, jnp.float32)
    got = nsa_attention(q, k, v, gates, cfg, block_sizes=SMALL)
    want = ref.nsa_reference(q, k, v, gates, cfg)
    tu.assert_close(got, want, jnp.float32, "o")
    assert np.isfinite(np.asarray(got)).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g", [1, 7, 16])
@pytest.mark.parametrize("block", [16, 64, 128])
def test_nsa_sweep(rng, dtype, g, block):
    """Block sizes 16..128 with default tiles; bf16 selects every block (see above)."""
    t = 3 * block + 5
    n = 4 if dtype == jnp.bfloat16 else 2
    cfg = ref.NSAConfig(block_size=block, num_selected=n, window=block + 3)
    q, k, v = tu.qkv(rng, 2, t, 2 * g, 2, 64, dtype)
    gates = _gates(rng, 2, t, 2 * g, dtype)
    seg = tu.packed_segments(rng, 2, t)

    def fn(q, k, v, gates):
        return nsa_attention(q, k, v, gates, cfg, segment_ids=seg)

    def want(q, k, v, gates):
        return ref.nsa_reference(q, k, v, gates, cfg, segment_ids=seg)

    tu.check_fwd_and_grads(fn, want, (q, k, v, gates), dtype, ["q", "k", "v", "gates"])


def test_lists_walked_in_chunks_match_reference(rng):
    """A 64-entry list budget splits every kernel's lists over several calls: query-tile chunks
    (the last one overlapping the one before) and dk/dv pair chunks carried in f32."""
    cfg = ref.NSAConfig(block_size=16, num_selected=3, window=20)
    b, t, hq, hkv, d = 1, 77, 7, 1, 64
    tight = NSABlockSizes(
        CompressedBlockSizes(block_q=16, block_kv=16, select_chunk=2, list_budget=64),
        SelectedBlockSizes(block_q=4, list_budget=64),
        WindowBlockSizes(block_q=16, block_kv=16, list_budget=64),
    )
    nq = cdiv(t, 4)
    num_u = min(cfg.num_sel_blocks(t), 4 * cfg.num_selected)
    assert bs.query_chunk(b, hkv, nq, num_u, 64) < nq  # the selected lists do not fit one call
    assert bs.pair_chunk(b, hkv, nq * num_u, 64) < nq * num_u
    q, k, v = tu.qkv(rng, b, t, hq, hkv, d, jnp.float32)
    gates = _gates(rng, b, t, hq, jnp.float32)
    seg = tu.packed_segments(rng, b, t)

    def fn(q, k, v, gates):
        return nsa_attention(q, k, v, gates, cfg, segment_ids=seg, block_sizes=tight)

    def want(q, k, v, gates):
        return ref.nsa_reference(q, k, v, gates, cfg, segment_ids=seg)

    tu.check_fwd_and_grads(fn, want, (q, k, v, gates), jnp.float32, ["q", "k", "v", "gates"])
