"""Pallas GPU NSA kernels (`pallas_kernels.gpu`) give the reference's outputs and gradients.

On a CPU the kernels run in Pallas interpret mode (the small case runs by default, the sweep
with `-m slow`); on a GPU they are compiled by the Triton lowering (`-m gpu`, run on the lent
H100 with `JAX_PLATFORMS=cuda`). The top-n choice is compared on its own: a near-tie in block
importance may flip under bf16 rounding, and one flipped block moves that token's output far
more than rounding does, so outputs and gradients are compared against the reference's
branches fed *our* selection (which is also the reference's wherever the choices agree).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.gpu import BlockSizes, nsa_attention, nsa_indices
from pallas_kernels.gpu import nsa as gpu_nsa
from pallas_kernels.gpu.banded import BandParams, key_tile_ranges, query_tile_ranges
from pallas_kernels.gpu.select import stride_offsets
from pallas_kernels.gpu.selected import (
    SelParams,
    selected_attention,
    selected_mixed,
    tile_unions,
)
from pallas_kernels.reference.segments import cmp_block_segments

ON_GPU = jax.default_backend() == "gpu"
# small tiles keep interpret mode quick; the GPU runs the default tiles
SMALL_TILES = BlockSizes(
    cmp_q=32,
    cmp_k=16,
    cmp_q_bwd=32,
    cmp_k_bwd=16,
    win_q=32,
    win_k=32,
    win_q_bwd=32,
    win_k_bwd=32,
    score_q=32,
    slc_rows=16,
    slc_item_chunks=4,
)


def rel(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_given(q, k, v, gates, idx, cfg, seg, params=None) -> jax.Array:
    """The reference NSA with the top-n choice `idx: [B, T, Hkv, n]` imposed."""
    kc, vc = ref.compress_kv(k, v, cfg, params)
    o_cmp, _ = ref.compressed_attention(q, kc, vc, cfg, segment_ids=seg)
    o_slc = ref.selected_attention(q, k, v, idx, cfg, segment_ids=seg)
    o_swa = ref.sliding_window_attention(q, k, v, cfg.window, segment_ids=seg)
    return ref.combine_branches(gates, o_cmp, o_slc, o_swa)


def reference_selection(q, k, cfg, seg, params=None) -> jax.Array:
    kc, _ = ref.compress_kv(k, k, cfg, params)
    _, lse = ref.compressed_attention(q, kc, kc, cfg, segment_ids=seg)
    return ref.select_blocks(q, kc, lse, cfg, segment_ids=seg)


def check_against_reference(
    rng: np.random.Generator,
    *,
    t: int,
    hq: int,
    hkv: int,
    d: int,
    cfg: ref.NSAConfig,
    dtype,
    tol: float,
    min_agree: float,
    tiles: BlockSizes | None,
) -> None:
    f32 = jnp.float32
    q, ct = (jnp.asarray(rng.standard_normal((1, t, hq, d)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, d)), dtype) for _ in range(2))
    gates = jnp.asarray(rng.uniform(0.05, 0.95, (1, t, hq, 3)), dtype)
    # two packed samples and a padded tail
    seg = np.ones((1, t), np.int32)
    seg[:, t // 2 + 5 :] = 2
    seg[:, t - 9 :] = 0
    seg = jnp.asarray(seg)
    interpret = None if ON_GPU else True

    # every computation jitted: one compile each, where op by op (interpreted kernels and the
    # reference alike) compiles hundreds of small programs
    def ours(q, k, v, gates):
        return nsa_attention(
            q, k, v, gates, cfg, segment_ids=seg, block_sizes=tiles, interpret=interpret
        )

    idx = jax.jit(
        lambda q, k, v: nsa_indices(
            q, k, v, cfg, segment_ids=seg, block_sizes=tiles, interpret=interpret
        )
    )(q, k, v)

    def theirs(q, k, v, gates):
        up = (x.astype(f32) for x in (q, k, v, gates))
        return reference_given(*up, idx, cfg, seg)

    with jax.default_matmul_precision("highest"):
        idx_ref = jax.jit(lambda q, k: reference_selection(q, k, cfg, seg))(
            q.astype(f32), k.astype(f32)
        )
        o_ref = jax.jit(theirs)(q, k, v, gates)
        g_ref = jax.jit(jax.grad(lambda *a: (theirs(*a) * ct.astype(f32)).sum(), (0, 1, 2, 3)))(
            q, k, v, gates
        )
    live = np.broadcast_to(np.asarray(seg)[:, :, None, None] > 0, idx.shape)
    same = np.sort(np.asarray(idx), -1) == np.sort(np.asarray(idx_ref), -1)
    assert same[live].mean() >= min_agree

    o = jax.jit(ours)(q, k, v, gates)
    assert o.dtype == dtype and np.isfinite(np.asarray(o, np.float32)).all()
    assert rel(o, o_ref) <= tol
    grads = jax.jit(
        jax.grad(lambda *a: (ours(*a).astype(f32) * ct.astype(f32)).sum(), (0, 1, 2, 3))
    )(q, k, v, gates)
    for name, a, b in zip(("dq", "dk", "dv", "dgates"), grads, g_ref, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert rel(a, b) <= tol, (name, rel(a, b))


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case; the GPU runs the compiled cases")
# the two-branch epilogue (window 0) under `-m slow`: the GPU's compiled cases run both
@pytest.mark.parametrize("window", [48, pytest.param(0, marks=pytest.mark.slow)])
def test_interpreted_kernels_match_reference_gqa7(rng, window: int) -> None:
    """Two or three branches mixed in the selected kernel's epilogue (window on / off)."""
    cfg = ref.NSAConfig(block_size=32, num_selected=3, window=window)
    check_against_reference(
        rng,
        t=200,
        hq=7,
        hkv=1,
        d=32,
        cfg=cfg,
        dtype=jnp.float32,
        tol=1e-5,
        min_agree=1.0,
        tiles=SMALL_TILES,
    )


WHOLE_TILES = BlockSizes(
    cmp_q=32,
    cmp_k=8,
    cmp_q_bwd=32,
    cmp_k_bwd=8,
    win_q=16,
    win_k=16,
    win_q_bwd=16,
    win_k_bwd=16,
    score_q=32,
    slc_rows=16,
    slc_item_chunks=4,
)


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case; the GPU runs the compiled cases")
def test_interpreted_kernels_match_reference_with_unmasked_tiles(rng) -> None:
    """Tiles that every query of a tile sees whole skip the mask (compressed and window
    branches, forward, dQ and dK/dV); packed samples and padding keep masked tiles around."""
    cfg = ref.NSAConfig(block_size=16, num_selected=3, window=64)
    t = 320
    plan = gpu_nsa.make_plan(1, t, 7, 1, 32, cfg, WHOLE_TILES, interpret=True)
    seg = jnp.asarray(np.repeat([[1, 2, 0]], [t // 2 + 5, t // 2 - 14, 9], axis=1))
    segp = jnp.pad(seg, ((0, 0), (0, plan.tp - t)))
    bseg = cmp_block_segments(seg, cfg)
    bseg = jnp.pad(bseg, ((0, 0), (0, plan.ncp - bseg.shape[1])), constant_values=-1)
    pos = jnp.arange(plan.tp, dtype=jnp.int32)[None]
    for params, segk in ((plan.cmp, bseg), (plan.win, segp)):
        for bq, bk in ((params.block_q, params.block_k), (params.block_q_bwd, params.block_k_bwd)):
            for ranges in (key_tile_ranges, query_tile_ranges):
                _, _, a, b = ranges(pos, segp, segk, params, bq, bk)
                assert (b > a).any()
    check_against_reference(
        rng,
        t=t,
        hq=7,
        hkv=1,
        d=32,
        cfg=cfg,
        dtype=jnp.float32,
        tol=1e-5,
        min_agree=1.0,
        tiles=WHOLE_TILES,
    )


def _visible_np(p, q_pos: np.ndarray, seg_q: np.ndarray, seg_k: np.ndarray) -> np.ndarray:
    """`[Tq, Nk]` visibility by the banded kernels' rule, one pair at a time."""
    pos = np.arange(seg_k.size) * p.stride + p.offset
    t = q_pos[:, None]
    vis = (pos[None] <= t) & (seg_q[:, None] == seg_k[None]) & (seg_q[:, None] > 0)
    if p.window:
        vis &= pos[None] > t - p.window
    return vis


def _in(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """`[len(lo), n]`: is column `j` in `[lo, hi)` of its row?"""
    j = np.arange(n)[None]
    return (j >= lo[:, None]) & (j < hi[:, None])


@pytest.mark.parametrize("layout", ["one", "packed", "interleaved", "gathered"])
@pytest.mark.parametrize("stride,offset,window", [(16, 15, 0), (1, 0, 40), (1, 0, 0)])
def test_tile_ranges_hold_every_visible_tile_and_mark_the_whole_ones(
    rng, layout: str, stride: int, offset: int, window: int
) -> None:
    """`key_tile_ranges` / `query_tile_ranges`: `[lo, hi)` holds every tile pair with a visible
    key, `[a, b)` never marks a tile pair with a hidden one as whole, and with contiguous
    samples it marks every whole pair (interleaved ids may lose some). "gathered": 80 rows at
    sorted random positions of the packed layout (the first and the last, a padding token,
    among them) and 16 unused slots (segment 0)."""
    t, bq, bk = 384, 16, (8 if stride == 1 else 2)
    seg = {
        "one": np.ones(t, np.int32),
        "packed": np.repeat([1, 2, 3, 0], [100, 150, 120, 14]).astype(np.int32),
        "gathered": np.repeat([1, 2, 3, 0], [100, 150, 120, 14]).astype(np.int32),
        "interleaved": np.repeat([1, 2, 1, 2], [96, 96, 96, 96]).astype(np.int32),
    }[layout]
    q_pos, seg_q = np.arange(t, dtype=np.int32), seg
    if layout == "gathered":
        rows = np.sort(rng.choice(np.arange(1, t - 1), 78, replace=False))
        q_pos = np.concatenate([[0], rows, [t - 1], np.zeros(16)]).astype(np.int32)
        seg_q = np.where(np.arange(96) < 80, seg[q_pos], 0).astype(np.int32)
    nk = t // stride
    seg_k = seg[offset::stride][:nk] if stride > 1 else seg
    p = BandParams(stride=stride, offset=offset, window=window, scale=1.0)
    vis = _visible_np(p, q_pos, seg_q, seg_k).reshape(q_pos.size // bq, bq, nk // bk, bk)
    seen, whole = vis.any((1, 3)), vis.all((1, 3))
    args = (jnp.asarray(q_pos[None]), jnp.asarray(seg_q[None]), jnp.asarray(seg_k[None]), p, bq, bk)
    lo, hi, a, b = (np.asarray(x)[0] for x in key_tile_ranges(*args))
    by_query = (_in(lo, hi, nk // bk), _in(a, b, nk // bk))
    lo, hi, a, b = (np.asarray(x)[0] for x in query_tile_ranges(*args))
    by_key = (_in(lo, hi, q_pos.size // bq).T, _in(a, b, q_pos.size // bq).T)
    for walked, marked in (by_query, by_key):
        assert not (seen & ~walked).any()
        assert not (marked & ~whole).any()
        if layout != "interleaved":
            np.testing.assert_array_equal(marked, whole)
    # (16 gathered rows span more positions than the window: no tile of them sees one whole)
    assert whole.any() or (layout == "gathered" and window)


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="interpret-mode sweep; the GPU runs the compiled cases")
@pytest.mark.parametrize(
    "hq,hkv,window,tokens,dq_in_dkv",
    [
        (16, 1, 0, 1, True),
        (2, 2, 40, 1, False),
        (14, 2, 64, 1, True),
        (7, 1, 48, 2, False),
        (7, 1, 48, 9, False),
        (2, 2, 40, 4, False),
    ],
)
def test_interpreted_kernels_sweep(
    rng, hq: int, hkv: int, window: int, tokens: int, dq_in_dkv: bool
) -> None:
    cfg = ref.NSAConfig(block_size=32, num_selected=4, window=window)
    tiles = dataclasses.replace(SMALL_TILES, slc_tokens=tokens, slc_dq_in_dkv=dq_in_dkv)
    check_against_reference(
        rng,
        t=230,
        hq=hq,
        hkv=hkv,
        d=32,
        cfg=cfg,
        dtype=jnp.float32,
        tol=1e-5,
        min_agree=1.0,
        tiles=tiles,
    )


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case")
@pytest.mark.parametrize("n", [3, 8, 16])
def test_top_n_breaks_ties_like_lax_top_k(rng, n: int) -> None:
    """The register-resident top-n picks the reference's blocks, ties included: half the
    queries are zero, so every ended block scores the same for them and the tie rule alone
    decides (the lower block index wins, as in `lax.top_k`); with fewer candidates than slots
    early in each segment, and across packed segments and padding."""
    t, hq, hkv, d = 384, 4, 2, 32
    cfg = ref.NSAConfig(block_size=16, num_selected=n, window=0)
    q = np.asarray(rng.standard_normal((1, t, hq, d)), np.float32)
    q[:, ::2] = 0.0
    k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, d)), jnp.float32) for _ in range(2))
    seg = np.ones((1, t), np.int32)
    seg[:, 150:] = 2
    seg[:, t - 20 :] = 0
    q, seg = jnp.asarray(q), jnp.asarray(seg)
    idx = np.asarray(
        nsa_indices(q, k, v, cfg, segment_ids=seg, block_sizes=SMALL_TILES, interpret=True)
    )
    with jax.default_matmul_precision("highest"):
        idx_ref = np.asarray(reference_selection(q, k, cfg, seg))
    np.testing.assert_array_equal(np.sort(idx, -1), np.sort(idx_ref, -1))
    for tok in range(0, 150, 2):  # zero queries of the first sample: the lowest blocks win
        cur = tok // 16
        forced = sorted({cur, max(cur - 1, 0), 0})
        rest = [j for j in range(cur + 1) if j not in forced][: n - len(forced)]
        want = sorted(forced + rest) + [-1] * (n - len(forced) - len(rest))
        assert sorted(idx[0, tok, 0]) == sorted(want), tok


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case")
@pytest.mark.parametrize(
    "l,d,lsel,hq,hkv",
    [
        (32, 16, 32, 4, 2),
        (64, 16, 32, 7, 1),
        (16, 16, 32, 16, 1),
        pytest.param(32, 16, 16, 2, 2, marks=pytest.mark.slow),
        pytest.param(48, 16, 32, 4, 2, marks=pytest.mark.slow),
    ],
)
def test_selection_maps_overlapping_compression_in_the_kernel(
    rng, l: int, d: int, lsel: int, hq: int, hkv: int
) -> None:
    """Compressed blocks other than the selection blocks (`l != l'` or `d < l`, NSA Eq. 9)
    are mapped inside the top-n kernel, which picks the reference's blocks, across packed
    segments and padding."""
    cfg = ref.NSAConfig(
        block_size=lsel, compress_block=l, compress_stride=d, num_selected=4, window=0
    )
    t, dh = 200, 32
    q = jnp.asarray(rng.standard_normal((1, t, hq, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, dh)), jnp.float32) for _ in range(2))
    seg = np.ones((1, t), np.int32)
    seg[:, 96:] = 2
    seg[:, t - 7 :] = 0
    seg = jnp.asarray(seg)
    idx = nsa_indices(q, k, v, cfg, segment_ids=seg, block_sizes=SMALL_TILES, interpret=True)
    with jax.default_matmul_precision("highest"):
        idx_ref = reference_selection(q, k, cfg, seg)
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(np.asarray(idx_ref), -1))


@pytest.mark.parametrize("l,d,lsel", [(16, 16, 16), (32, 16, 32), (64, 16, 32), (16, 16, 64)])
def test_stride_offsets_are_the_rows_of_eq9(l: int, d: int, lsel: int) -> None:
    cfg = ref.NSAConfig(block_size=lsel, compress_block=l, compress_stride=d)
    a, r, weights = stride_offsets(cfg)
    w = ref.cmp_to_sel_weights(1024, cfg)  # [Nc, Nsel]
    for j in range(3, w.shape[1]):
        got = np.zeros(w.shape[0])
        got[a * j - r + 1 : a * j - r + 1 + len(weights)] = weights
        np.testing.assert_array_equal(w[:, j], got)


@pytest.mark.skipif(ON_GPU, reason="interpret-mode case; the GPU runs the compiled cases")
@pytest.mark.parametrize(
    "hq,hkv,tokens",
    [
        (7, 1, 9),
        (16, 1, 4),
        pytest.param(7, 1, 1, marks=pytest.mark.slow),
        pytest.param(2, 2, 8, marks=pytest.mark.slow),
    ],
)
def test_selected_token_tiles_match_reference(rng, hq: int, hkv: int, tokens: int) -> None:
    """The selected branch alone, group-centric (`tokens` 1) or over token tiles (`tokens * G`
    rows: 63 of 64 at G = 7, 64 at G = 16), against the reference given the same blocks:
    outputs and the gradients of q, k, v, across two packed samples and padding."""
    t, d, block, n = 72, 16, 8, 4
    q, ct = (jnp.asarray(rng.standard_normal((1, t, hq, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((1, t, hkv, d)), jnp.float32) for _ in range(2))
    seg = np.ones((1, t), np.int32)
    seg[:, 30:] = 2
    seg[:, t - 5 :] = 0
    seg = jnp.asarray(seg)
    idx = np.full((1, t, hkv, n), -1, np.int32)
    for i in np.ndindex(t, hkv):  # distinct blocks up to the token's own, some slots empty
        own = i[0] // block + 1
        chosen = rng.choice(own, size=min(own, n, rng.integers(1, n + 2)), replace=False)
        idx[(0, *i)][: chosen.size] = chosen
    idx = jnp.asarray(idx)
    cfg = ref.NSAConfig(block_size=block, num_selected=n)
    p = SelParams(block=block, scale=d**-0.5, rows=16, item_chunks=4, tokens=tokens, interpret=True)

    def ours(q, k, v):
        return selected_attention(q, k, v, seg, idx, p)

    def theirs(q, k, v):
        return ref.selected_attention(q, k, v, idx, cfg, segment_ids=seg)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: (f(*a) * ct).sum(), (0, 1, 2)))(q, k, v)

    with jax.default_matmul_precision("highest"):
        assert rel(jax.jit(ours)(q, k, v), jax.jit(theirs)(q, k, v)) <= 1e-5
        for name, a, b in zip(("dq", "dk", "dv"), grads(ours), grads(theirs), strict=True):
            assert rel(a, b) <= 1e-5, (name, rel(a, b))


def test_tile_unions_are_each_tiles_chosen_blocks(rng) -> None:
    b, t, hkv, n, nblocks, tokens = 2, 12, 3, 4, 9, 4
    idx = np.full((b, t, hkv, n), -1, np.int32)
    for i in np.ndindex(b, t, hkv):  # distinct blocks per token, some slots empty
        chosen = rng.choice(nblocks, size=rng.integers(0, n + 1), replace=False)
        idx[i][: chosen.size] = chosen
    blk, bits, count = (np.asarray(x) for x in tile_unions(jnp.asarray(idx), tokens))
    for bi, ti, hi in np.ndindex(b, t // tokens, hkv):
        toks = idx[bi, ti * tokens : (ti + 1) * tokens, hi]
        union = sorted({int(x) for x in toks.ravel() if x >= 0})
        c = count[bi, ti, hi]
        assert list(blk[bi, ti, hi, :c]) == union
        for u, blkid in enumerate(union):
            assert bits[bi, ti, hi, u] == sum(1 << j for j in range(tokens) if blkid in toks[j])


@pytest.mark.parametrize(
    "tokens,dq_in_dkv,window,stride",
    [(1, False, 128, 64), (2, True, 128, 64), (1, False, 0, 64), (1, False, 128, 16)],
)
def test_kernels_lower_to_triton_without_a_gpu(
    tokens: int, dq_in_dkv: bool, window: int, stride: int
) -> None:
    """Forward and backward lower for CUDA on any machine: every kernel is a Triton call
    (overlapping compression, `d < l`, included)."""
    cfg = ref.NSAConfig(block_size=64, compress_stride=stride, num_selected=8, window=window)
    q = jax.ShapeDtypeStruct((1, 512, 28, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    gates = jax.ShapeDtypeStruct((1, 512, 28, 3), jnp.bfloat16)
    tiles = BlockSizes(slc_tokens=tokens, slc_dq_in_dkv=dq_in_dkv)

    def loss(q, k, v, g):
        o = nsa_attention(q, k, v, g, cfg, block_sizes=tiles, interpret=False)
        return o.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, (0, 1, 2, 3)))
    text = grad.trace(q, kv, kv, gates).lower(lowering_platforms=("cuda",)).as_text()
    kernels = set(re.findall(r'name = "(nsa_[a-z_]+)"', text))
    expected = [
        "banded_fwd",
        "banded_dq",
        "banded_dkv",
        "select_top_blocks",
        "selected_fwd",
        "selected_dkv",
    ] + ([] if dq_in_dkv else ["selected_dq"])
    assert kernels == {f"nsa_{k}" for k in expected}


def test_fused_gate_mix_needs_one_token_per_program() -> None:
    q = jnp.zeros((1, 128, 4, 32), jnp.float32)
    kv = jnp.zeros((1, 128, 1, 32), jnp.float32)
    idx = jnp.zeros((1, 128, 1, 2), jnp.int32)
    p = SelParams(block=32, scale=1.0, tokens=2, interpret=True)
    with pytest.raises(ValueError, match="tokens=1"):
        selected_mixed(
            q, kv, kv, jnp.ones((1, 128), jnp.int32), idx, jnp.zeros((1, 128, 4, 3)), q, None, p
        )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda -m gpu)")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize(
    "hq,hkv,d,tokens,dq_in_dkv,stride",
    [
        (28, 4, 128, 1, False, 64),
        (28, 4, 128, 2, True, 64),
        (28, 4, 128, 9, False, 64),
        (28, 4, 128, 1, False, 32),
        (64, 4, 64, 1, False, 64),
        (64, 4, 64, 8, False, 64),
        (4, 4, 128, 4, True, 64),
    ],
    ids=[
        "g7",
        "g7-tiles2-dqatomic",
        "g7-tiles9",
        "g7-overlap",
        "g16-d64",
        "g16-d64-tiles8",
        "g1-tiles4-dqatomic",
    ],
)
def test_compiled_kernels_match_reference(
    rng, dtype, hq: int, hkv: int, d: int, tokens: int, dq_in_dkv: bool, stride: int
) -> None:
    """`stride` 32: overlapping compression (`d < l`), whose scores the selection kernel maps
    to selection blocks; `tokens` 9 at G = 7: 63-row tiles (64 with padding)."""
    cfg = ref.NSAConfig(block_size=64, compress_stride=stride, num_selected=8, window=128)
    bf16 = dtype == jnp.bfloat16
    check_against_reference(
        rng,
        t=1000,
        hq=hq,
        hkv=hkv,
        d=d,
        cfg=cfg,
        dtype=dtype,
        tol=2e-2 if bf16 else 1e-4,
        min_agree=0.97 if bf16 else 0.999,
        tiles=BlockSizes(slc_tokens=tokens, slc_dq_in_dkv=dq_in_dkv),
    )
