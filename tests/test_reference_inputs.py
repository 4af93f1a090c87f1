"""Bad input is reported as a ValueError that names the argument; size limits of the reference."""

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

from nsa_jax.attention import NSAConfig, compress_kv, nsa_attention, sliding_window_attention

from variants import VariantsTestCase


def _ok(t=32, hq=4, hkv=2, d=8):
    x = np.random.default_rng(0).standard_normal
    return (
        x((1, t, hq, d)).astype(np.float32),
        x((1, t, hkv, d)).astype(np.float32),
        x((1, t, hkv, d)).astype(np.float32),
        np.full((1, t, hq, 3), 0.5, np.float32),
    )


CFG = NSAConfig(block_size=8, num_selected=2, window=4)


BAD_ARRAYS = [
    (lambda q, k, v, g: (q[0], k, v, g), "q must have rank 4"),
    (lambda q, k, v, g: (q, k[:, :16], v[:, :16], g), "must share batch and length"),
    (lambda q, k, v, g: (q, k, v[..., :4], g), "k and v must have the same shape"),
    (lambda q, k, v, g: (q[:, :, :3], k, v, g[:, :, :3]), "multiple of the number of key/value"),
    (lambda q, k, v, g: (q, k, v, g[..., :2]), "gates must have shape"),
    (lambda q, k, v, g: (q[:, :0], k[:, :0], v[:, :0], g[:, :0]), "T = 0"),
]


class TestChecksCompiledAndEager(VariantsTestCase):
    """The checks read shapes and dtypes, never values: they name bad input under `jit` as
    eagerly, and a NaN goes through either way (for jax_debug_nans to find; issue 13)."""

    def attend(self, **kwargs):
        return self.variant(functools.partial(nsa_attention, cfg=CFG, **kwargs))

    @chex.variants(with_jit=True, without_jit=True)
    # named cases: a lambda's repr holds its address, which differs between xdist workers
    @parameterized.named_parameters(
        (re.sub(r"\W+", "_", message).strip("_"), mutate, message) for mutate, message in BAD_ARRAYS
    )
    def test_bad_arrays_are_named(self, mutate, message):
        with pytest.raises(ValueError, match=message):
            self.attend()(*mutate(*_ok()))

    @chex.variants(with_jit=True, without_jit=True)
    def test_values_are_never_read(self):
        q, k, v, g = _ok()
        out = self.attend(implementation="reference")(np.where(np.arange(8) == 3, np.nan, q),
                                                      k, v, g)
        assert np.isnan(np.asarray(out)).any()

    @chex.variants(with_jit=True, without_jit=True)
    def test_bad_segment_ids_are_named(self):
        with pytest.raises(ValueError, match="segment_ids must have shape"):
            self.attend()(*_ok(), segment_ids=np.ones((1, 31), np.int32))
        with pytest.raises(ValueError, match="segment_ids must be integer"):
            self.attend()(*_ok(), segment_ids=np.ones((1, 32), np.float32))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"num_selected": -1}, "num_selected must be a positive integer"),
        ({"window": -2}, "window must be a non-negative integer"),
        (
            {"block_size": 64, "compress_stride": 48, "compress_block": 96},
            "select block must be a multiple of the compression stride",
        ),
        ({"compress_block": 24, "compress_stride": 16}, "multiple of the compression stride"),
        ({"compression": "max"}, "compression must be 'mean' or 'mlp'"),
        ({"gate_temperature": 0.0}, "gate_temperature must be > 0"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NSAConfig(**kwargs)


def test_config_defaults_are_videonsa_training_setting():
    cfg = NSAConfig()
    assert (cfg.block_size, cfg.cmp_block, cfg.cmp_stride) == (64, 64, 64)
    assert (cfg.num_selected, cfg.window, cfg.compression) == (32, 256, "mean")
    assert cfg.gate_temperature == 0.3 and not cfg.videonsa_compat
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 512  # type: ignore[misc]


def test_mlp_compression_needs_params():
    q, k, v, _ = _ok()
    with pytest.raises(ValueError, match="compression='mlp' needs params"):
        compress_kv(k, v, NSAConfig(block_size=8, compression="mlp"))


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="implementation must be 'auto' or one of"):
        nsa_attention(*_ok(), CFG, implementation="cuda")


def test_window_must_be_non_negative():
    q, k, v, _ = _ok()
    with pytest.raises(ValueError, match="window must be a non-negative integer"):
        sliding_window_attention(q, k, v, -1)


def test_8k_tokens_fit_without_a_dense_score_matrix():
    """T = 8192, Hq = 28, Hkv = 4, D = 128, float32 (VideoNSA's setting): XLA's own buffer
    plan must stay far below one [T, T] score matrix per head (28 * 8192^2 * 4 B = 7 GiB)."""
    t, hq, hkv, d = 8192, 28, 4, 128
    shapes = [
        jax.ShapeDtypeStruct(s, jnp.float32)
        for s in ((1, t, hq, d), (1, t, hkv, d), (1, t, hkv, d), (1, t, hq, 3))
    ]
    fn = jax.jit(lambda *a: nsa_attention(*a, NSAConfig(), implementation="reference"))
    mem = fn.lower(*shapes).compile().memory_analysis()
    temp = mem.temp_size_in_bytes
    assert temp < 1 * 2**30, f"temporary buffers {temp / 2**20:.0f} MiB"


def test_loss_and_grad_memory_is_linear_in_tokens():
    """The reference's loss and gradient at T and 4T (16-token blocks, so T / 16 compressed
    blocks): temporaries may grow 4.5x at most. Differentiating the query-chunk map without
    rematerialising each chunk kept the compressed branch's `[T, Hq, Nc]` probabilities: 5.6x
    from 1K to 4K tokens and 9.0x from 4K to 16K."""
    cfg = NSAConfig(block_size=16, num_selected=2, window=16)
    hq, hkv, d = 4, 2, 16

    def temp_bytes(t: int) -> int:
        shapes = [
            jax.ShapeDtypeStruct(s, jnp.float32)
            for s in ((1, t, hq, d), (1, t, hkv, d), (1, t, hkv, d), (1, t, hq, 3))
        ]

        def loss(*a):
            return nsa_attention(*a, cfg, implementation="reference").sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    m1, m2 = temp_bytes(2048), temp_bytes(8192)
    assert m2 <= 4.5 * m1, f"2048 -> 8192 tokens: {m1} -> {m2} bytes ({m2 / m1:.2f}x)"
