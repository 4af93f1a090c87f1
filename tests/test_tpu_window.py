"""Sliding-window attention kernels (Pallas TPU, interpret mode) against the reference."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.tiles import WindowBlockSizes
from pallas_kernels.tpu import TPUInterpretParams, layout
from pallas_kernels.tpu import block_sparse as bs
from pallas_kernels.tpu.tokens import Side, kernel_inputs
from pallas_kernels.tpu.window import band_lists, sliding_window_attention
from tests import tpu_utils as tu


def _check(rng, b, t, hq, hkv, d, dtype, window, bsz, with_segments):
    q, k, v = tu.qkv(rng, b, t, hq, hkv, d, dtype)
    seg = tu.packed_segments(rng, b, t) if with_segments else None

    def fn(q, k, v):
        return sliding_window_attention(q, k, v, window, segment_ids=seg, block_sizes=bsz)

    def want(q, k, v):
        return ref.sliding_window_attention(q, k, v, window, segment_ids=seg)

    tu.check_fwd_and_grads(fn, want, (q, k, v), dtype, "qkv")


@pytest.mark.parametrize(
    "dtype, hq, hkv, d, window, block_q, block_kv, with_segments",
    [
        # GQA 7, window < tiles, T off the tiles: f32 GQA 7 with packed samples and a window
        # shorter than the tiles is also the whole NSA's default case (test_tpu_nsa.py), so
        # only `-m slow` runs it alone
        pytest.param(jnp.float32, 7, 1, 64, 5, 8, 16, True, marks=pytest.mark.slow),
        (jnp.bfloat16, 16, 1, 128, 20, 4, 16, True),  # GQA 16, window spans three tiles
        (jnp.float32, 2, 2, 40, 64, 16, 32, False),  # GQA 1, head dim padded, window > T
    ],
)
def test_window_matches_reference(
    rng, dtype, hq, hkv, d, window, block_q, block_kv, with_segments
):
    bsz = WindowBlockSizes(block_q=block_q, block_kv=block_kv)
    _check(rng, 1, 45, hq, hkv, d, dtype, window, bsz, with_segments)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g", [1, 7, 16])
@pytest.mark.parametrize("window", [2, 48, 256])  # window 1: dq is 0 up to rounding
def test_window_sweep(rng, dtype, g, window):
    bsz = WindowBlockSizes(block_q=16, block_kv=32)
    _check(rng, 2, 301, 2 * g, 2, 64, dtype, window, bsz, True)


def test_band_lists_visit_only_the_band():
    lists = band_lists(100, 20, WindowBlockSizes(block_q=16, block_kv=16), b=1, hkv=1)
    # query tile 3 covers tokens 48..63, its band starts at token 29: key tiles 1..3
    assert lists.num_u == 3
    assert lists.kv_list.reshape(7, 3)[3].tolist() == [1, 2, 3]
    assert lists.kv_count.tolist() == [1, 2, 3, 3, 3, 3, 3]
    assert lists.kv_list.reshape(7, 3)[0].tolist() == [0, 0, 0]  # tail repeats: no new DMA


def test_static_pairs_match_the_xla_sort():
    """The band's backward pairs, sorted in NumPy at trace time, are `pair_lists`' own."""
    b, hkv, t = 2, 3, 100
    lists = band_lists(t, 20, WindowBlockSizes(block_q=16, block_kv=16), b=b, hkv=hkv)
    nq = -(-t // 16)
    want = bs.pair_lists(dataclasses.replace(lists, pairs=None), b, hkv, nq, -(-t // 16))
    got = bs.pair_lists(lists, b, hkv, nq)
    assert got is lists.pairs and got.num_p == want.num_p
    for name in ("pair_kv", "pair_q", "pair_count"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name


def test_window_zero_is_zeros(rng):
    q, k, v = tu.qkv(rng, 1, 9, 2, 1, 64, jnp.float32)
    assert not sliding_window_attention(q, k, v, 0).any()


def test_block_sizes_checked():
    with pytest.raises(ValueError, match="block_kv must be a multiple of 16"):
        WindowBlockSizes(block_kv=24)
    with pytest.raises(ValueError, match="block_q"):
        WindowBlockSizes(block_q=0)


def test_window_kernels_race_free(rng):
    """Forward, dq and dk/dv with the race detector and two simulated cores."""
    b, t, hq, hkv, d, window = 1, 32, 4, 2, 64, 12
    bsz = WindowBlockSizes(block_q=8, block_kv=16)
    q, k, v = tu.qkv(rng, b, t, hq, hkv, d, jnp.float32)
    seg = tu.packed_segments(rng, b, t)
    tokens = Side(seg, jnp.arange(t))
    x = kernel_inputs(
        q, k, v, queries=tokens, keys=tokens, block_q=bsz.block_q, block_kv=bsz.block_kv,
        lists=band_lists(t, window, bsz, b, hkv), spec=bs.MaskSpec(window=window),
        interpret=TPUInterpretParams(detect_races=True, num_cores_or_threads=2),
    )
    o = tu.assert_kernels_race_free(x)
    want = ref.sliding_window_attention(q, k, v, window, segment_ids=seg)
    tu.assert_close(layout.from_rows(o, t, hq, d), want, jnp.float32, "o")
