"""Selected-block attention kernels (Pallas TPU, interpret mode) against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.tiles import SelectedBlockSizes
from pallas_kernels.tpu import TPUInterpretParams, layout, tpu_races_found
from pallas_kernels.tpu import block_sparse as bs
from pallas_kernels.tpu.selected import selected_attention, tile_lists
from tests import tpu_utils as tu


def _case(rng, b, t, hq, hkv, d, dtype, cfg, with_segments):
    q, k, v = tu.qkv(rng, b, t, hq, hkv, d, dtype)
    seg = tu.packed_segments(rng, b, t) if with_segments else None
    kc, vc = ref.compress_kv(k, v, cfg)
    _, lse = ref.compressed_attention(q, kc, vc, cfg, segment_ids=seg)
    idx = ref.select_blocks(q, kc, lse, cfg, segment_ids=seg)
    return q, k, v, seg, idx


@pytest.mark.parametrize(
    "dtype, hq, hkv, d, block, block_q, with_segments",
    [
        # GQA 7, T not a multiple of either tile: f32 GQA 7 with packed samples is also the
        # whole NSA's default case, with 4-token tiles in its chunked-list test
        # (test_tpu_nsa.py), so only `-m slow` runs it alone
        pytest.param(jnp.float32, 7, 1, 64, 16, 8, True, marks=pytest.mark.slow),
        (jnp.bfloat16, 16, 1, 128, 32, 4, True),  # GQA 16
        (jnp.float32, 2, 2, 40, 24, 16, False),  # GQA 1, head dim and block padded
        # the default tile: 18 tokens x a group of 7 = 126 rows (two KV heads, T = 45 leaves
        # a partial last tile of 9 tokens)
        (jnp.float32, 14, 2, 64, 16, None, True),
    ],
)
def test_selected_matches_reference(rng, dtype, hq, hkv, d, block, block_q, with_segments):
    cfg = ref.NSAConfig(block_size=block, num_selected=3, window=0)
    q, k, v, seg, idx = _case(rng, 1, 45, hq, hkv, d, dtype, cfg, with_segments)
    bsz = SelectedBlockSizes(block_q=block_q)

    def fn(q, k, v):
        return selected_attention(q, k, v, idx, cfg, segment_ids=seg, block_sizes=bsz)

    def want(q, k, v):
        return ref.selected_attention(q, k, v, idx, cfg, segment_ids=seg)

    tu.check_fwd_and_grads(fn, want, (q, k, v), dtype, "qkv")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g", [1, 7, 16])
@pytest.mark.parametrize("block", [16, 64, 128])
def test_selected_sweep(rng, dtype, g, block):
    cfg = ref.NSAConfig(block_size=block, num_selected=4, window=0)
    t = 5 * block + 3
    q, k, v, seg, idx = _case(rng, 2, t, 2 * g, 2, 64, dtype, cfg, True)

    def fn(q, k, v):
        return selected_attention(q, k, v, idx, cfg, segment_ids=seg)

    def want(q, k, v):
        return ref.selected_attention(q, k, v, idx, cfg, segment_ids=seg)

    tu.check_fwd_and_grads(fn, want, (q, k, v), dtype, "qkv")


def test_tile_lists_dedupe_and_fill():
    idx = jnp.asarray([[[[2, 0, -1]], [[0, 2, 1]], [[3, -1, -1]]]], jnp.int32)  # [1, 3, 1, 3]
    lists = tile_lists(idx, block_q=2, num_u=4)
    assert lists.kv_count.tolist() == [3, 1]
    assert lists.kv_list.tolist() == [0, 1, 2, 2, 3, 3, 3, 3]  # tails repeat the last block


def test_block_sizes_checked():
    with pytest.raises(ValueError, match="block_q"):
        SelectedBlockSizes(block_q=0)


def test_default_tile_fills_the_mxu_rows():
    """Tokens per tile fill up to 128 rows for the group (GQA 1 stops at 32 tokens)."""
    bsz = SelectedBlockSizes()
    assert [bsz.tokens(g) * g for g in (16, 7, 4, 1, 200)] == [128, 126, 128, 32, 200]
    assert SelectedBlockSizes(block_q=8).tokens(7) == 8


def test_selected_kernels_race_free(rng):
    """Forward, dq and dk/dv with the race detector and two simulated cores."""
    cfg = ref.NSAConfig(block_size=16, num_selected=2, window=0)
    b, t, hq, hkv, d, bq = 2, 32, 4, 2, 64, 8
    q, k, v, seg, idx = _case(rng, b, t, hq, hkv, d, jnp.float32, cfg, True)
    g = hq // hkv
    pos = jnp.arange(t)
    q_seg, q_pos = layout.q_meta(seg, pos, bq, g)
    k_seg, k_pos = layout.k_meta(seg, pos, 16, 16)
    ir = layout.idx_rows(idx, bq, g)
    lists = tile_lists(idx, bq, 2)
    qr = layout.q_rows(q, hkv, bq, d)
    kt, vt = layout.kv_tiles(k, 16, 16, d), layout.kv_tiles(v, 16, 16, d)
    kw = dict(
        scale=d**-0.5,
        spec=bs.MaskSpec(use_member=True),
        interpret=TPUInterpretParams(detect_races=True, num_cores_or_threads=2),
    )
    o, lse = bs.sparse_fwd(qr, q_seg, q_pos, ir, kt, vt, k_seg, k_pos, lists, **kw)
    assert not tpu_races_found()
    want = ref.selected_attention(q, k, v, idx, cfg, segment_ids=seg)
    tu.assert_close(layout.from_rows(o, t, hq, d), want, jnp.float32, "o")
    delta = jnp.zeros_like(lse)
    args = (qr, q_seg, q_pos, ir, qr, lse, delta, kt, vt, k_seg, k_pos)
    jax.block_until_ready(bs.sparse_dq(*args, lists, **kw))
    assert not tpu_races_found()
    dk, _ = bs.sparse_dkdv(*args, bs.pair_lists(lists, b, hkv, qr.shape[2]), **kw)
    jax.block_until_ready(dk)
    assert not tpu_races_found()
    assert np.isfinite(np.asarray(dk)).all()
