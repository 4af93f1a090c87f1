"""Compressed attention and block selection kernels (Pallas TPU, interpret mode) against the
reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.tpu import TPUInterpretParams, layout, tpu_races_found
from pallas_kernels.tpu import block_sparse as bs
from pallas_kernels.tpu import compressed as cmp
from pallas_kernels.tpu.tokens import kernel_inputs
from tests import tpu_utils as tu

PLAIN = ref.NSAConfig(block_size=16, num_selected=3, window=0)
OVERLAP = ref.NSAConfig(block_size=16, compress_block=8, compress_stride=4, num_selected=3,
                        window=0)  # fmt: skip
COMPAT = ref.NSAConfig(block_size=16, num_selected=3, window=0, videonsa_compat=True)


def _o_and_lse(o: jax.Array, lse: jax.Array) -> jax.Array:
    """One f32 output carrying both, so one check covers the gradients through each."""
    lse = jnp.where(jnp.isinf(lse), 0.0, lse)
    return jnp.concatenate([o.astype(jnp.float32), lse[..., None]], -1)


def _check(rng, t, hq, hkv, d, dtype, cfg, bsz, with_segments):
    q, k, v = tu.qkv(rng, 1, t, hq, hkv, d, dtype)
    seg = tu.packed_segments(rng, 1, t) if with_segments else None

    def run(attn):
        def f(q, k, v):  # through the XLA compression, so dk and dv are checked too
            kc, vc = ref.compress_kv(k, v, cfg)
            return _o_and_lse(*attn(q, kc, vc, cfg, segment_ids=seg))

        return f

    kernel = run(lambda *a, **kw: cmp.compressed_attention(*a, **kw, block_sizes=bsz))
    tu.check_fwd_and_grads(kernel, run(ref.compressed_attention), (q, k, v), dtype, "qkv")


@pytest.mark.parametrize(
    "dtype, hq, hkv, d, cfg, with_segments",
    [
        # GQA 7, T off the tiles: f32 GQA 7 with packed samples and plain blocks is also the
        # whole NSA's default case (test_tpu_nsa.py), so only `-m slow` runs it alone
        pytest.param(jnp.float32, 7, 1, 64, PLAIN, True, marks=pytest.mark.slow),
        (jnp.bfloat16, 16, 1, 128, OVERLAP, True),  # GQA 16, overlapping blocks, 2 key tiles
        (jnp.float32, 2, 2, 40, COMPAT, False),  # GQA 1, head dim padded, reversed rule
    ],
)
def test_compressed_matches_reference(rng, dtype, hq, hkv, d, cfg, with_segments):
    bsz = cmp.CompressedBlockSizes(block_q=16, block_kv=16)
    _check(rng, 77, hq, hkv, d, dtype, cfg, bsz, with_segments)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g", [1, 7, 16])
@pytest.mark.parametrize("cfg", [PLAIN, OVERLAP, COMPAT], ids=["plain", "overlap", "compat"])
def test_compressed_sweep(rng, dtype, g, cfg):
    bsz = cmp.CompressedBlockSizes(block_q=16, block_kv=16)
    _check(rng, 301, 2 * g, 2, 64, dtype, cfg, bsz, True)


@pytest.mark.parametrize(
    "hq, hkv, cfg, with_segments",
    [
        (7, 1, PLAIN, True),
        (2, 1, COMPAT, True),  # OVERLAP: in the race test
        pytest.param(16, 1, PLAIN, False, marks=pytest.mark.slow),
        pytest.param(4, 2, OVERLAP, True, marks=pytest.mark.slow),
    ],
)
def test_select_blocks_matches_reference(rng, hq, hkv, cfg, with_segments):
    """Same indices as the reference, in the same order (f32: ties are exact zeros)."""
    t = 90
    q, k, v = tu.qkv(rng, 2, t, hq, hkv, 64, jnp.float32)
    seg = tu.packed_segments(rng, 2, t) if with_segments else None
    kc, vc = ref.compress_kv(k, v, cfg)
    _, lse = ref.compressed_attention(q, kc, vc, cfg, segment_ids=seg)
    bsz = cmp.CompressedBlockSizes(block_q=8, block_kv=16, select_chunk=4)  # 3 chunks
    got = cmp.select_blocks(q, kc, lse, cfg, segment_ids=seg, block_sizes=bsz)
    want = ref.select_blocks(q, kc, lse, cfg, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_select_chunks_shrink_to_a_byte_cap(rng):
    """The top-n chunk holds at most `select_bytes` of scores: 1M tokens (16K selection blocks,
    4 KV heads) take 8 tiles of 128 queries (256 MiB) instead of 32 (1 GiB); a cap below
    one tile's scores still takes one tile, and the chosen blocks do not depend on the cap."""
    bsz = cmp.CompressedBlockSizes()
    assert cmp.select_chunk_tiles(bsz, 1, 4, 8192, 16384) == 8
    assert cmp.select_chunk_tiles(bsz, 1, 4, 1024, 2048) == 32
    assert cmp.select_chunk_tiles(dataclasses.replace(bsz, select_bytes=1), 1, 4, 8, 128) == 1
    t, cfg = 90, OVERLAP
    q, k, v = tu.qkv(rng, 1, t, 4, 2, 64, jnp.float32)
    kc, vc = ref.compress_kv(k, v, cfg)
    _, lse = ref.compressed_attention(q, kc, vc, cfg)
    tiny = cmp.CompressedBlockSizes(block_q=8, block_kv=16, select_bytes=2 * 8 * 128 * 4 * 2)
    got = cmp.select_blocks(q, kc, lse, cfg, block_sizes=tiny)  # 2 tiles per chunk, not 32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref.select_blocks(q, kc, lse, cfg)))


def test_prefix_lists_are_causal():
    bsz = cmp.CompressedBlockSizes(block_q=16, block_kv=16)
    lists = cmp.prefix_lists(100, OVERLAP, bsz, b=1, hkv=1)  # 25 blocks ending at 7, 11, ...
    assert lists.num_u == 2
    # the query tile ending at token 63 sees blocks 0..14 (key tile 0), the next 0..18 (0, 1)
    assert lists.kv_count.tolist() == [1, 1, 1, 1, 2, 2, 2]
    rev = cmp.prefix_lists(100, COMPAT, bsz, b=1, hkv=1)  # 7 blocks, all in tile 0
    assert rev.kv_count.tolist() == [1] * 7


def test_block_sizes_checked():
    with pytest.raises(ValueError, match="block_kv must be a multiple of 16"):
        cmp.CompressedBlockSizes(block_kv=40)
    with pytest.raises(ValueError, match="select_chunk"):
        cmp.CompressedBlockSizes(select_chunk=0)


def test_compressed_kernels_race_free(rng):
    """Forward, dq, dk/dv and the importance kernel, race detector on, two simulated cores."""
    cfg, b, t, hq, hkv, d = OVERLAP, 1, 48, 4, 2, 64
    bsz = cmp.CompressedBlockSizes(block_q=8, block_kv=16)
    interpret = TPUInterpretParams(detect_races=True, num_cores_or_threads=2)
    q, k, v = tu.qkv(rng, b, t, hq, hkv, d, jnp.float32)
    seg = tu.packed_segments(rng, b, t)
    kc, vc = ref.compress_kv(k, v, cfg)
    queries, keys = cmp.sides(seg, t, cfg)
    x = kernel_inputs(
        q,
        kc,
        vc,
        queries=queries,
        keys=keys,
        block_q=bsz.block_q,
        block_kv=bsz.block_kv,
        lists=cmp.prefix_lists(t, cfg, bsz, b, hkv),
        spec=bs.MaskSpec(),
        interpret=interpret,
    )
    o = tu.assert_kernels_race_free(x)
    want, lse = ref.compressed_attention(q, kc, vc, cfg, segment_ids=seg)
    tu.assert_close(layout.from_rows(o, t, hq, d), want, jnp.float32, "o")
    idx = cmp.select_blocks(q, kc, lse, cfg, segment_ids=seg, block_sizes=bsz,
                            interpret=interpret)  # fmt: skip
    jax.block_until_ready(idx)
    assert not tpu_races_found(), "race in the importance kernel"
    want_idx = ref.select_blocks(q, kc, lse, cfg, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))


def test_selection_band_reassembles_eq9():
    """The per-tile bands, put back at their offsets, are exactly `_cmp_to_sel_weights`."""
    t, bk = 3000, 32
    sb = cmp.selection_band(t, OVERLAP, bk)
    proj = np.asarray(cmp.selection_proj(sb, bk))
    nc, ns = sb.weights.shape
    back = np.zeros((proj.shape[0] * bk, sb.width + sb.band), np.float32)
    for j, s in enumerate(sb.start):
        back[j * bk : (j + 1) * bk, s : s + sb.band] += proj[j, :bk]
    np.testing.assert_array_equal(back[:nc, :ns], sb.weights)
    assert not back[nc:].any() and not back[:, ns:].any()
    assert sb.band <= 256 and sb.start.max() > 0  # a band (two lane tiles), not all of Nsel


def test_select_blocks_long_row_uses_offset_bands(rng):
    """More than 128 selection blocks: key tiles project into bands at non-zero offsets."""
    cfg, t = PLAIN, 2100  # 132 selection blocks
    q, k, v = tu.qkv(rng, 1, t, 2, 1, 64, jnp.float32)
    kc, vc = ref.compress_kv(k, v, cfg)
    _, lse = ref.compressed_attention(q, kc, vc, cfg)
    assert cmp.selection_band(t, cfg, 128).start.tolist() == [0, 128]
    got = cmp.select_blocks(q, kc, lse, cfg)
    want = ref.select_blocks(q, kc, lse, cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
