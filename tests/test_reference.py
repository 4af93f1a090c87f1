"""The NSA reference, branch by branch, against the float64 oracle in `nsa_oracle.py`."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from nsa_jax.attention import (
    NSAConfig,
    compress_kv,
    compressed_attention,
    dense_attention,
    init_compress_params,
    nsa_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)
from pallas_kernels.reference import videonsa_topk

import nsa_oracle as oracle
from variants import VariantsTestCase

# (Hq, Hkv): GQA ratios 1, 7 and 16
RATIOS = [(3, 3), (14, 2), (16, 1)]
T, B, D = 75, 2, 16  # T is not a multiple of the block size


def make_qkv(rng: np.random.Generator, hq: int, hkv: int, t: int = T, b: int = B, d: int = D):
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    gates = rng.uniform(0.05, 0.95, (b, t, hq, 3)).astype(np.float32)
    return q, k, v, gates


def packed_segments(t: int = T, b: int = B) -> np.ndarray:
    """Row 0: two samples then padding; row 1: three samples (boundaries off the block grid)."""
    seg = np.zeros((b, t), np.int32)
    seg[0, :30], seg[0, 30:68] = 1, 2
    seg[1, :20], seg[1, 20:51], seg[1, 51:] = 1, 2, 3
    return seg


def spec_of(cfg: NSAConfig) -> oracle.Spec:
    return oracle.Spec(
        cfg.block_size,
        cfg.cmp_block,
        cfg.cmp_stride,
        cfg.num_selected,
        cfg.window,
        cfg.videonsa_compat,
    )


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def as_sets(idx) -> list:
    idx = np.asarray(idx)
    return [
        [
            [set(int(j) for j in idx[b, t, g] if j >= 0) for g in range(idx.shape[2])]
            for t in range(idx.shape[1])
        ]
        for b in range(idx.shape[0])
    ]


CONFIGS = {
    "block16": NSAConfig(block_size=16, num_selected=3, window=20),
    "overlap": NSAConfig(
        block_size=16, compress_block=16, compress_stride=8, num_selected=3, window=9
    ),
    "finer_cmp": NSAConfig(
        block_size=16, compress_block=8, compress_stride=4, num_selected=2, window=5
    ),
    # block 8: ten blocks, so fla's top-k has earlier blocks to rank besides its forced ones
    "compat": NSAConfig(block_size=8, num_selected=4, window=20, videonsa_compat=True),
}


@pytest.mark.parametrize("hq,hkv", RATIOS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", ["block16", "overlap", "compat"])
def test_compressed_attention_matches_oracle(rng, hq, hkv, packed, name):
    cfg = CONFIGS[name]
    q, k, v, _ = make_qkv(rng, hq, hkv)
    seg = packed_segments() if packed else None
    k_cmp, v_cmp = compress_kv(k, v, cfg)
    o, lse = compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg)

    spec = spec_of(cfg)
    k64, v64 = (
        oracle.compress(k.astype(np.float64), spec, None, "k"),
        oracle.compress(v.astype(np.float64), spec, None, "v"),
    )
    o_ref, lse_ref, _ = oracle.compressed(q.astype(np.float64), k64, v64, spec, seg)
    assert rel_err(k_cmp, k64) < 1e-6
    assert rel_err(o, o_ref) < 1e-5
    finite = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], lse_ref[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(o)[~finite], 0.0)  # sees nothing -> zero output


def test_queries_before_the_first_complete_block_see_nothing(rng):
    cfg = NSAConfig(block_size=16)
    q, k, v, _ = make_qkv(rng, 4, 2)
    o, lse = compressed_attention(q, *compress_kv(k, v, cfg), cfg)
    assert np.all(np.isneginf(np.asarray(lse)[:, :15])) and np.all(np.asarray(o)[:, :15] == 0)
    assert np.all(np.isfinite(np.asarray(lse)[:, 15:]))  # c*d + l - 1 <= t from t = 15 on


@pytest.mark.parametrize("hq,hkv", RATIOS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", ["block16", "overlap", "finer_cmp", "compat"])
def test_select_blocks_matches_oracle(rng, hq, hkv, packed, name):
    cfg = CONFIGS[name]
    q, k, v, _ = make_qkv(rng, hq, hkv)
    seg = packed_segments() if packed else None
    k_cmp, v_cmp = compress_kv(k, v, cfg)
    _, lse = compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg)
    idx = select_blocks(q, k_cmp, lse, cfg, segment_ids=seg)
    assert idx.shape == (B, T, hkv, cfg.num_selected) and idx.dtype == jnp.int32

    spec = spec_of(cfg)
    k64, v64 = (
        oracle.compress(x.astype(np.float64), spec, None, n) for x, n in ((k, "k"), (v, "v"))
    )
    _, lse64, probs = oracle.compressed(q.astype(np.float64), k64, v64, spec, seg)
    if cfg.videonsa_compat:  # fla's top-k: its own scores from q, k_cmp and the lse
        expected = oracle.fla_topk(q.astype(np.float64), k64, lse64, spec, seg)
    else:
        expected = oracle.select(oracle.sel_scores(probs, hkv, T, spec), spec, seg)
    assert as_sets(idx) == expected
    idx = np.asarray(idx)
    # each row: distinct ids first, -1 padding after
    for row in idx.reshape(-1, cfg.num_selected):
        used = row[row >= 0]
        assert len(set(used)) == len(used)


def test_select_blocks_forces_first_current_and_previous(rng):
    cfg = NSAConfig(block_size=8, num_selected=4, window=0)
    q, k, v, _ = make_qkv(rng, 8, 2, t=100)
    k_cmp, v_cmp = compress_kv(k, v, cfg)
    _, lse = compressed_attention(q, k_cmp, v_cmp, cfg)
    idx = np.asarray(select_blocks(q, k_cmp, lse, cfg))
    for t in range(100):
        sel = set(idx[0, t, 0]) - {-1}
        cur = t // 8
        assert {0, cur, max(cur - 1, 0)} <= sel
        assert len(sel) == min(4, cur + 1)  # unused slots are -1 only when too few blocks exist


@pytest.mark.parametrize("version", ["0.3.1", "0.3.0"])
@pytest.mark.parametrize("packed", [False, True])
def test_videonsa_topk_matches_fla_rule(rng, version, packed):
    """Both fla rules on any log-sum-exp (here a random one, as VideoNSA's misread layout is:
    the top-k must not assume that it normalises anything)."""
    cfg = CONFIGS["compat"]
    q, k, _, _ = make_qkv(rng, 32, 2)
    seg = packed_segments() if packed else None
    lse = rng.normal(1.0, 2.0, (B, T, 32)).astype(np.float32)
    k_cmp, _ = compress_kv(k, k, cfg)
    idx = videonsa_topk(q, k_cmp, lse, cfg, segment_ids=seg, fla_version=version)
    spec = spec_of(cfg)
    k64 = oracle.compress(k.astype(np.float64), spec, None, "k")
    want = oracle.fla_topk(q.astype(np.float64), k64, lse.astype(np.float64), spec, seg, version)
    assert as_sets(idx) == want
    # forced blocks only score G: earlier blocks above it push the current one out somewhere
    cur = np.arange(T)[None, :, None, None] // cfg.block_size
    live = np.ones((B, T), bool) if seg is None else seg > 0
    assert np.any(np.all(np.asarray(idx) != cur, -1) & live[..., None])


def test_compat_selection_needs_equal_block_sizes(rng):
    cfg = NSAConfig(block_size=16, compress_stride=8, num_selected=2, videonsa_compat=True)
    q, k, _, _ = make_qkv(rng, 4, 2)
    k_cmp, _ = compress_kv(k, k, cfg)
    lse = np.zeros((B, T, 4), np.float32)
    with pytest.raises(ValueError, match="needs compress_block == compress_stride == block_size"):
        select_blocks(q, k_cmp, lse, cfg)


@pytest.mark.parametrize("hq,hkv", RATIOS)
@pytest.mark.parametrize("packed", [False, True])
def test_selected_attention_matches_oracle(rng, hq, hkv, packed):
    cfg = CONFIGS["block16"]
    q, k, v, _ = make_qkv(rng, hq, hkv)
    seg = packed_segments() if packed else None
    # arbitrary distinct blocks, some in the future, with -1 holes: the kernel contract
    ns = -(-T // cfg.block_size)
    cur = np.broadcast_to(np.arange(T)[None, :, None] // cfg.block_size, (B, T, hkv)).ravel()
    idx = np.stack(
        [np.concatenate([[c], rng.permutation(np.setdiff1d(np.arange(ns), [c]))[:2]]) for c in cur]
    ).reshape(B, T, hkv, 3)
    idx[..., 1:][rng.random(idx[..., 1:].shape) < 0.2] = -1
    o = selected_attention(q, k, v, jnp.asarray(idx, jnp.int32), cfg, segment_ids=seg)
    o_ref = oracle.selected(
        q.astype(np.float64),
        k.astype(np.float64),
        v.astype(np.float64),
        as_sets(idx),
        spec_of(cfg),
        seg,
    )
    assert rel_err(o, o_ref) < 1e-5


@pytest.mark.parametrize("hq,hkv", RATIOS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("w", [1, 7, 200])
def test_sliding_window_matches_oracle(rng, hq, hkv, packed, w):
    q, k, v, _ = make_qkv(rng, hq, hkv)
    seg = packed_segments() if packed else None
    o = sliding_window_attention(q, k, v, w, segment_ids=seg, query_chunk=16)
    o_ref = oracle.window(*(x.astype(np.float64) for x in (q, k, v)), w, seg)
    assert rel_err(o, o_ref) < 1e-5


def test_window_zero_turns_the_branch_off(rng):
    q, k, v, _ = make_qkv(rng, 4, 2)
    assert not np.any(np.asarray(sliding_window_attention(q, k, v, 0)))


@pytest.mark.parametrize("hq,hkv", RATIOS)
@pytest.mark.parametrize("name", ["block16", "overlap", "compat"])
def test_nsa_matches_oracle(rng, hq, hkv, name):
    cfg = CONFIGS[name]
    q, k, v, gates = make_qkv(rng, hq, hkv)
    seg = packed_segments()
    o = nsa_attention(q, k, v, gates, cfg, segment_ids=seg, implementation="reference")
    o_ref, _ = oracle.nsa(q, k, v, gates, spec_of(cfg), seg)
    assert rel_err(o, o_ref) < 1e-5
    assert not np.any(np.asarray(o)[seg == 0])  # padding queries return zeros


def test_mlp_compression_matches_oracle(rng):
    cfg = NSAConfig(
        block_size=16,
        compress_block=16,
        compress_stride=8,
        num_selected=3,
        window=9,
        compression="mlp",
    )
    q, k, v, gates = make_qkv(rng, 14, 2)
    params = init_compress_params(jax.random.key(int(rng.integers(1 << 30))), cfg, D)
    params = {
        n: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()
    }
    k_cmp, _ = compress_kv(k, v, cfg, params)
    spec = spec_of(cfg)
    p64 = {n: np.asarray(p, np.float64) for n, p in params.items()}
    assert rel_err(k_cmp, oracle.compress(k.astype(np.float64), spec, p64, "k")) < 1e-5
    o = nsa_attention(q, k, v, gates, cfg, compress_params=params, implementation="reference")
    o_ref, _ = oracle.nsa(q, k, v, gates, spec, None, params)
    assert rel_err(o, o_ref) < 1e-5


def test_dense_attention_matches_oracle_with_segments(rng):
    q, k, v, _ = make_qkv(rng, 14, 2)
    seg = packed_segments()
    for s in (None, seg):
        o = dense_attention(q, k, v, s)
        o_ref = oracle.dense(*(x.astype(np.float64) for x in (q, k, v)), s)
        assert rel_err(o, o_ref) < 1e-5


def test_packed_samples_on_block_boundaries_equal_samples_alone(rng):
    """Packing (samples starting on the block grid) changes nothing for any sample."""
    cfg = NSAConfig(block_size=16, num_selected=3, window=20)
    q, k, v, g = make_qkv(rng, 8, 2, t=96, b=1)
    seg = np.zeros((1, 96), np.int32)
    seg[0, :48], seg[0, 48:90] = 1, 2
    packed = np.asarray(nsa_attention(q, k, v, g, cfg, segment_ids=seg))
    for lo, hi in ((0, 48), (48, 90)):
        alone = nsa_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], cfg)
        np.testing.assert_allclose(packed[:, lo:hi], alone, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_follow_f32(rng):
    cfg = CONFIGS["block16"]
    q, k, v, gates = make_qkv(rng, 14, 2)
    o32 = nsa_attention(q, k, v, gates, cfg)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    o16 = nsa_attention(*bf, gates, cfg)
    assert o16.dtype == jnp.bfloat16
    assert rel_err(o16, o32) < 2e-2


class TestBranchesCompiledAndEager(VariantsTestCase):
    """Each branch of the reference under `jax.jit` and eagerly, against the oracle: packed
    rows (off the block grid), GQA ratio 7, overlapping compression and the compat rules."""

    hq, hkv = 14, 2

    def inputs(self):
        return (*make_qkv(self.rng, self.hq, self.hkv), packed_segments())

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("overlap", "compat")
    def test_compressed_attention(self, name: str):
        cfg = CONFIGS[name]
        q, k, v, _, seg = self.inputs()

        def branch(q, k, v, seg):
            k_cmp, v_cmp = compress_kv(k, v, cfg)
            return (k_cmp, *compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg))

        k_cmp, o, lse = self.variant(branch)(q, k, v, seg)
        spec = spec_of(cfg)
        k64, v64 = (oracle.compress(x.astype(np.float64), spec, None, n)
                    for x, n in ((k, "k"), (v, "v")))
        o_ref, lse_ref, _ = oracle.compressed(q.astype(np.float64), k64, v64, spec, seg)
        assert rel_err(k_cmp, k64) < 1e-6 and rel_err(o, o_ref) < 1e-5
        finite = np.isfinite(lse_ref)
        np.testing.assert_array_equal(np.isfinite(lse), finite)
        np.testing.assert_allclose(np.asarray(lse)[finite], lse_ref[finite], rtol=1e-5,
                                   atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("overlap", "compat")
    def test_select_blocks(self, name: str):
        cfg = CONFIGS[name]
        q, k, v, _, seg = self.inputs()

        def select(q, k, v, seg):
            k_cmp, v_cmp = compress_kv(k, v, cfg)
            _, lse = compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg)
            return select_blocks(q, k_cmp, lse, cfg, segment_ids=seg)

        idx = self.variant(select)(q, k, v, seg)
        spec = spec_of(cfg)
        k64, v64 = (oracle.compress(x.astype(np.float64), spec, None, n)
                    for x, n in ((k, "k"), (v, "v")))
        _, lse64, probs = oracle.compressed(q.astype(np.float64), k64, v64, spec, seg)
        if cfg.videonsa_compat:
            want = oracle.fla_topk(q.astype(np.float64), k64, lse64, spec, seg)
        else:
            want = oracle.select(oracle.sel_scores(probs, self.hkv, T, spec), spec, seg)
        assert as_sets(idx) == want

    @chex.variants(with_jit=True, without_jit=True)
    def test_selected_and_window_attention(self):
        cfg = CONFIGS["block16"]
        q, k, v, _, seg = self.inputs()
        k_cmp, v_cmp = compress_kv(k, v, cfg)
        _, lse = compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg)
        idx = select_blocks(q, k_cmp, lse, cfg, segment_ids=seg)  # the branch's real input

        def branches(q, k, v, idx, seg):
            return (selected_attention(q, k, v, idx, cfg, segment_ids=seg),
                    sliding_window_attention(q, k, v, 7, segment_ids=seg, query_chunk=16))

        o_slc, o_swa = self.variant(branches)(q, k, v, idx, seg)
        q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
        assert rel_err(o_slc, oracle.selected(q64, k64, v64, as_sets(idx), spec_of(cfg),
                                              seg)) < 1e-5
        assert rel_err(o_swa, oracle.window(q64, k64, v64, 7, seg)) < 1e-5

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("overlap", "compat")
    def test_nsa_attention(self, name: str):
        cfg = CONFIGS[name]
        q, k, v, gates, seg = self.inputs()
        o = self.variant(functools.partial(nsa_attention, cfg=cfg, implementation="reference"))(
            q, k, v, gates, segment_ids=seg)
        assert rel_err(o, oracle.nsa(q, k, v, gates, spec_of(cfg), seg)[0]) < 1e-5
