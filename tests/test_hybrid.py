"""Hybrid attention (`attention/hybrid.py`) against independent float64 statements of its rules.

Clean form: text queries dense and causal, video queries NSA (`nsa_oracle`), gates
`sigmoid(logits / temperature)`.

`videonsa_compat=True`: the released VideoNSA rules (the "videonsa_compat" sections of
`docs/nsa.md` and `docs/model.md`), token by token, reusing only the generic NSA branches of
`nsa_oracle` (mean-pooled compression, compressed attention with the compat mask
`q_idx <= (c + 1) * l - 1`, selected and window attention, dense attention, and the top-k of
the fla 0.3.0 that VideoNSA vendors, `fla_topk`). The released parts are spelled out here: the
text/vision split, head padding, zeroed text q/k/v, gate handling and the
log-sum-exp layout accident.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from nsa_jax.attention import (
    AttentionConfig,
    NSAConfig,
    compress_kv,
    compressed_attention,
    dense_attention,
    nsa_attention,
    nsa_reference,
    select_blocks,
)
from nsa_jax.attention.compat import compat_vision_mask, videonsa_lse, videonsa_nsa
from nsa_jax.attention.hybrid import gate_values, hybrid_attention
from pallas_kernels.reference import videonsa_topk
from pallas_kernels.tiles import BlockSizes, NSABlockSizes, WindowBlockSizes

import nsa_oracle as oracle
from variants import VariantsTestCase

GROUP = 16  # fla-core needs 16 query heads per KV head; VideoNSA pads to that
SPEC = oracle.Spec(block=4, cmp_block=4, stride=4, n=3, window=6, compat=True)
TEMPERATURE = 0.3


def read_lse(lse: np.ndarray, layout: str) -> np.ndarray:
    """The `[B, T, H]` log-sum-exp fla's top-k reads. flex_attention wrote the true one as
    `[B, H, T]` memory; fla reads entry (t, h) at flat offset `t*H + h` of that memory."""
    if layout == "correct":
        return lse
    b, t, h = lse.shape
    out = np.empty_like(lse)
    for ti in range(t):
        for hi in range(h):
            flat = ti * h + hi
            out[:, ti, hi] = lse[:, flat % t, flat // t]
    return out


def released_mixed_attention(q, k, v, gate_logits, positions, layout: str) -> np.ndarray:
    """VideoNSA's `_mixed_attention` as its rules say; shapes as `hybrid_attention`'s."""
    q, k, v, gate_logits = (np.asarray(x, np.float64) for x in (q, k, v, gate_logits))
    b, t, hq, _ = q.shape
    hp = GROUP * k.shape[2]
    t_pos, h_pos, w_pos = np.asarray(positions)
    vision = ~((t_pos == h_pos) & (h_pos == w_pos))[:, :, None, None]  # t == h == w is text

    def pad(x: np.ndarray) -> np.ndarray:  # [x, x, 0] up to 16 heads per KV head
        return np.concatenate([x, x, np.zeros((b, t, hp - 2 * hq, *x.shape[3:]))], axis=2)

    q_n, k_n, v_n = pad(q * vision), k * vision, v * vision  # text q/k/v zeroed, not masked
    gates = pad(1 / (1 + np.exp(-np.where(vision, gate_logits, 0.0) / TEMPERATURE)))
    k_cmp, v_cmp = oracle.compress(k_n, SPEC, None, "k"), oracle.compress(v_n, SPEC, None, "v")
    o_cmp, lse, _ = oracle.compressed(q_n, k_cmp, v_cmp, SPEC)
    sets = oracle.fla_topk(q_n, k_cmp, read_lse(lse, layout), SPEC)
    o_slc = oracle.selected(q_n, k_n, v_n, sets, SPEC)  # padded head p reads KV head p // 16
    o_swa = oracle.window(q_n, k_n, v_n, SPEC.window)
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_swa
    o_nsa = (o[:, :, :hq] + o[:, :, hq : 2 * hq]) / 2
    o_dense = oracle.dense(q * ~vision, k, v)  # vision queries zeroed, keys untouched
    return o_nsa + o_dense


def mrope_positions() -> np.ndarray:
    """`[3, 1, T]`: 3 text tokens, a video of 2 x 2 x 3 merged patches, 7 text tokens. Patches
    (0, 0, 0) and (1, 1, 1) have t == h == w, so the released split calls them text."""
    s = 3
    grid = [(s + ti, s + hi, s + wi) for ti in range(2) for hi in range(2) for wi in range(3)]
    text_before = [(i, i, i) for i in range(s)]
    text_after = [(s + 3 + i,) * 3 for i in range(7)]
    return np.asarray(text_before + grid + text_after).T[:, None, :]


@pytest.fixture
def inputs(rng):
    pos = mrope_positions()
    t, hq, hkv, d = pos.shape[-1], 6, 2, 8
    q = rng.standard_normal((1, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((1, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((1, t, hkv, d)).astype(np.float32)
    gate_logits = rng.standard_normal((1, t, hq, 3)).astype(np.float32)
    return q, k, v, gate_logits, pos


def run_ours(q, k, v, gate_logits, pos, layout: str) -> np.ndarray:
    cfg = NSAConfig(
        block_size=SPEC.block,
        num_selected=SPEC.n,
        window=SPEC.window,
        gate_temperature=TEMPERATURE,
        videonsa_compat=True,
    )
    is_vision = compat_vision_mask(jnp.asarray(pos))
    out = hybrid_attention(q, k, v, gate_logits, is_vision,
                           AttentionConfig(nsa=cfg, lse_layout=layout))
    return np.asarray(out)


def test_clean_form_routes_text_rows_to_dense_and_video_rows_to_nsa(inputs):
    q, k, v, gate_logits, pos = inputs
    is_video = np.zeros(q.shape[:2], bool)
    is_video[:, 3:15] = True  # the video's tokens, by token id
    cfg = NSAConfig(
        block_size=SPEC.block, num_selected=SPEC.n, window=SPEC.window, gate_temperature=TEMPERATURE
    )
    out = np.asarray(hybrid_attention(q, k, v, gate_logits, jnp.asarray(is_video),
                                      AttentionConfig(nsa=cfg)))
    gates = 1 / (1 + np.exp(-np.asarray(gate_logits, np.float64) / TEMPERATURE))
    clean = dataclasses.replace(SPEC, compat=False)
    nsa, _ = oracle.nsa(q, k, v, gates, clean)
    dense = oracle.dense(*(np.asarray(x, np.float64) for x in (q, k, v)))
    want = np.where(is_video[:, :, None, None], nsa, dense)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


class TestReleasedSplit(VariantsTestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_released_split_reads_positions_not_token_ids(self):
        vision = np.asarray(self.variant(compat_vision_mask)(jnp.asarray(mrope_positions())))[0]
        want = np.zeros(22, bool)
        want[3:15] = True
        want[[3, 3 + 6 + 4]] = False  # patches (0, 0, 0) and (1, 1, 1)
        np.testing.assert_array_equal(vision, want)


@pytest.mark.parametrize("layout", ["videonsa", "correct"])
def test_compat_attention_follows_the_released_rules(inputs, layout):
    want = released_mixed_attention(*inputs, layout)
    np.testing.assert_allclose(run_ours(*inputs, layout), want, rtol=1e-4, atol=1e-5)


def test_lse_layout_changes_the_selection_here(inputs):
    # guards the test above: with these inputs the two layouts select different blocks
    assert not np.allclose(run_ours(*inputs, "videonsa"), run_ours(*inputs, "correct"))


@pytest.mark.parametrize("t", [45, 200])  # 200: several query chunks, many candidate blocks
def test_select_blocks_compat_is_the_hybrid_selection(rng, t):
    """One top-k for VideoNSA: `select_blocks` under compat (what `nsa_reference` and the GPU
    compat fallback run) picks the hybrid's blocks, and the hybrid's NSA with the true
    log-sum-exp is `nsa_reference` under compat, on padded-head shapes (16 per KV head)."""
    hkv, d = 2, 8
    hp = GROUP * hkv
    cfg = NSAConfig(block_size=8, num_selected=4, window=5, videonsa_compat=True)
    q = rng.standard_normal((1, t, hp, d)).astype(np.float32)
    q[:, :, 12:GROUP] = 0.0  # the zero padding heads, as VideoNSA feeds them
    k, v = (rng.standard_normal((1, t, hkv, d)).astype(np.float32) for _ in range(2))
    gates = rng.uniform(0.05, 0.95, (1, t, hp, 3)).astype(np.float32)
    k_cmp, v_cmp = compress_kv(k, v, cfg)
    _, lse = compressed_attention(q, k_cmp, v_cmp, cfg)
    idx = np.asarray(select_blocks(q, k_cmp, lse, cfg))
    np.testing.assert_array_equal(idx, videonsa_topk(q, k_cmp, videonsa_lse(lse, "correct"), cfg))
    # not the old accident (current block plus the lowest blocks): earlier blocks compete
    cur = np.arange(t)[None, :, None] // cfg.block_size
    assert np.any(np.all(idx != 1, -1) & (cur >= 5)), "block 1 is never left out"
    np.testing.assert_allclose(
        videonsa_nsa(q, k, v, gates, cfg, "correct"),
        nsa_reference(q, k, v, gates, cfg),
        rtol=1e-6,
        atol=1e-6,
    )


# --------------------------------------------------------------------------- routed layer


def todays_formula(q, k, v, gate_logits, is_video, cfg, seg):
    """What the hybrid layer computed before routing: NSA and masked dense attention (a
    `[B, 1, T, T]` mask through XLA) over every row, then `where`."""
    o_nsa = nsa_reference(q, k, v, gate_values(gate_logits, cfg.gate_temperature), cfg,
                          segment_ids=seg)
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] > 0)
    o_dense = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                           implementation="xla")
    o_dense = jnp.where(seg[:, :, None, None] > 0, o_dense, 0.0)
    return jnp.where(is_video[:, :, None, None], o_nsa, o_dense)


def output_and_grads(fn, cot, n: int):
    """`fn(*args)` and the gradients of `sum(fn(*args) * cot)` with respect to its first `n`
    arguments, from one `jax.vjp` (one compilation under `jit`)."""

    def run(*args):
        out, pull = jax.vjp(lambda *diff: fn(*diff, *args[n:]), *args[:n])
        return out, pull(cot)

    return run


def routed_inputs(rng, b=2, t=77, hq=6, hkv=2, d=8):
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, hkv, d)), jnp.float32) for _ in range(2))
    gate_logits = jnp.asarray(rng.standard_normal((b, t, hq, 3)), jnp.float32)
    # row 0: two packed samples (text, video, text; text, video) then padding;
    # row 1: text rows scattered through a video, no padding
    seg = np.zeros((b, t), np.int32)
    seg[0, :40], seg[0, 40:70] = 1, 2
    seg[1] = 1
    video = np.zeros((b, t), bool)
    video[0, 5:33], video[0, 44:70] = True, True
    video[1, 3:] = True
    video[1, [i for i in (20, 21, 50, t - 1) if i < t]] = False
    return q, k, v, gate_logits, jnp.asarray(video), jnp.asarray(seg)


class TestRoutedLayer(VariantsTestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(None, 16)
    def test_routed_layer_equals_dense_and_nsa_over_every_row(self, text_rows):
        q, k, v, gate_logits, video, seg = routed_inputs(self.rng)
        cfg = NSAConfig(block_size=8, num_selected=3, window=10)
        cot = jnp.asarray(self.rng.standard_normal(q.shape), jnp.float32)
        assert int((~np.asarray(video) & (np.asarray(seg) > 0)).sum(-1).max()) <= 16

        def ours(q, k, v, g, video, seg):
            return hybrid_attention(q, k, v, g, video,
                                    AttentionConfig(nsa=cfg, implementation="reference"),
                                    segment_ids=seg, text_rows=text_rows)

        def today(q, k, v, g, video, seg):
            return todays_formula(q, k, v, g, video, cfg, seg)

        args = (q, k, v, gate_logits, video, seg)
        chex.assert_trees_all_close(self.variant(output_and_grads(ours, cot, 4))(*args),
                                    output_and_grads(today, cot, 4)(*args), rtol=1e-5,
                                    atol=1e-5)


def test_routed_layer_computes_only_the_gathered_text_rows(rng):
    # the dense part of the compiled layer holds [.., text_rows, key chunk] logits, not [T, T]
    q, k, v, gate_logits, video, seg = routed_inputs(rng, t=1024)
    cfg = NSAConfig(block_size=16, num_selected=2, window=16)

    def layer(rows):
        fn = functools.partial(hybrid_attention,
                               attn=AttentionConfig(nsa=cfg, implementation="reference"),
                               segment_ids=seg, text_rows=rows)
        return jax.make_jaxpr(lambda *a: fn(*a))(q, k, v, gate_logits, video)

    text = str(layer(16))
    assert "1024,1024" not in text and "16,512" in text


def masked_formula(q, k, v, seg):
    """Causal attention within segments through a `[B, 1, T, T]` mask, zero at padding."""
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] > 0)
    o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
    return jnp.where(seg[:, :, None, None] > 0, o, 0.0)


def test_pallas_dense_attention_equals_the_masked_formula(rng):
    q, k, v, _, _, seg = routed_inputs(rng, t=70)
    # the Pallas GPU kernel interpreted on a CPU
    np.testing.assert_allclose(dense_attention(q, k, v, seg, implementation="pallas_gpu"),
                               masked_formula(q, k, v, seg), rtol=1e-5, atol=1e-5)


class TestChunkedAttention(VariantsTestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_chunked_attention_equals_the_masked_formula(self):
        q, k, v, _, _, seg = routed_inputs(self.rng, t=70)
        cot = jnp.asarray(self.rng.standard_normal(q.shape), jnp.float32)

        def chunked(q, k, v, seg):
            return dense_attention(q, k, v, seg, implementation="chunked")

        chex.assert_trees_all_close(self.variant(output_and_grads(chunked, cot, 3))(q, k, v, seg),
                                    output_and_grads(masked_formula, cot, 3)(q, k, v, seg),
                                    rtol=1e-5, atol=1e-5)


def test_nsa_attention_traces_with_closed_over_gates_and_segments(rng):
    q, k, v, gate_logits, _, seg = routed_inputs(rng, t=40)
    gates = gate_values(gate_logits, 0.3)  # built outside the jitted function
    cfg = NSAConfig(block_size=8, num_selected=2, window=8)
    out = jax.jit(lambda q: nsa_attention(q, k, v, gates, cfg, segment_ids=seg,
                                          implementation="reference"))(q)
    np.testing.assert_allclose(out, nsa_reference(q, k, v, gates, cfg, segment_ids=seg),
                               rtol=1e-6, atol=1e-6)


def compat_cfg(version: str = "0.3.0") -> NSAConfig:
    return NSAConfig(block_size=SPEC.block, num_selected=SPEC.n, window=SPEC.window,
                     gate_temperature=TEMPERATURE, videonsa_compat=True, fla_topk=version)


class TestCompatPacking(VariantsTestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_compat_keeps_packed_samples_apart(self):
        q, k, v, gate_logits, _, _ = routed_inputs(self.rng, t=48)
        q, k, v, gate_logits = q[:1], k[:1], v[:1], gate_logits[:1]
        seg = jnp.asarray(np.repeat([1, 2], 24)[None], jnp.int32)  # samples on the block grid
        vision = jnp.asarray((np.arange(48) % 24 >= 3)[None])

        @self.variant
        def run(v, seg):
            return hybrid_attention(q, k, v, gate_logits, vision,
                                    AttentionConfig(nsa=compat_cfg(), lse_layout="correct"),
                                    segment_ids=seg)

        moved = v.at[:, 24:].multiply(3.0)  # change only the second sample's values
        chex.assert_trees_all_close(run(moved, seg)[:, :24], run(v, seg)[:, :24], rtol=1e-6,
                                    atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_compat_refuses_packed_rows_under_the_released_layout(self):
        """Concrete segment ids are refused before the call; traced ones cannot be read, so a
        packed row comes out NaN, and a row of one sample and padding as it does eagerly."""
        q, k, v, gate_logits, _, _ = routed_inputs(self.rng, b=2, t=48)
        seg = jnp.asarray(np.stack([np.repeat([1, 2], 24), np.repeat([1, 0], [40, 8])]),
                          jnp.int32)  # row 0 packed, row 1 one sample then padding
        vision = jnp.asarray(np.broadcast_to(np.arange(48) % 24 >= 3, (2, 48)))

        def run(q, k, v, g, vision, seg):
            return hybrid_attention(q, k, v, g, vision, AttentionConfig(nsa=compat_cfg()),
                                    segment_ids=seg)

        args = (q, k, v, gate_logits, vision)
        if self.variant.type == chex.ChexVariantType.WITHOUT_JIT:
            with pytest.raises(ValueError, match="cannot pack samples"):
                self.variant(run)(*args, seg)
            return
        out = np.asarray(self.variant(run)(*args, seg))
        assert np.isnan(out[0]).all()
        alone = run(*(x[1:] for x in args), seg[1:])  # eager: the unpacked row is accepted
        np.testing.assert_allclose(out[1:], alone, rtol=1e-6, atol=1e-6)


def test_compat_top_k_defaults_to_the_vendored_fla_rule():
    assert NSAConfig().fla_topk == "0.3.0"  # ms-swift/fla and lmms-eval/fla: v0.3.0
    with pytest.raises(ValueError, match="fla_topk"):
        NSAConfig(fla_topk="0.2.0")


def kernel_grids(attn: AttentionConfig, q, k, v, g, video) -> set[str]:
    """The `grid=(...)` of every Pallas call the hybrid layer traces with `attn`."""
    jaxpr = str(jax.make_jaxpr(lambda q: hybrid_attention(q, k, v, g, video, attn))(q))
    return set(re.findall(r"grid=\([^)]*\)", jaxpr))


def test_the_kernel_tiles_of_the_attention_config_reach_the_kernels(rng):
    """The layer's `AttentionConfig` travels whole to the backend: its GPU tile sizes set the
    kernels' grids (token tiles of 2 in the selected kernel: 32 programs over 64 tokens) and
    give the reference's values; its TPU tile sizes set the TPU kernels' grids."""
    q, k, v, g, video, _ = routed_inputs(rng, t=64)
    q, k, v, g, video = q[:1], k[:1], v[:1], g[:1], video[:1]
    cfg = NSAConfig(block_size=16, num_selected=2, window=16)
    gpu = AttentionConfig(nsa=cfg, implementation="pallas_gpu")
    tiled = gpu.replace(gpu_blocks=BlockSizes(win_q=16, win_k=16, slc_tokens=2))
    assert "grid=(32, 2, 1)" in kernel_grids(tiled, q, k, v, g, video)
    assert "grid=(32, 2, 1)" not in kernel_grids(gpu, q, k, v, g, video)
    want = hybrid_attention(q, k, v, g, video, gpu.replace(implementation="reference"))
    np.testing.assert_allclose(hybrid_attention(q, k, v, g, video, tiled), want,
                               rtol=1e-5, atol=1e-5)
    tpu = AttentionConfig(nsa=cfg, implementation="pallas_tpu")
    small = tpu.replace(tpu_blocks=NSABlockSizes(window=WindowBlockSizes(block_q=16)))
    assert kernel_grids(small, q, k, v, g, video) != kernel_grids(tpu, q, k, v, g, video)
