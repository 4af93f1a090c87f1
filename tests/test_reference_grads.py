"""Gradients of the reference: `jax.grad` against central differences of the float64 oracle.

For a random cotangent W and direction U, `<grad_x sum(W * o), U>` must equal
`(F(x + eps U) - F(x - eps U)) / (2 eps)` with F computed by the oracle in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.attention import NSAConfig, init_compress_params, nsa_attention

import nsa_oracle as oracle

T, B, D = 40, 1, 8
EPS = 1e-4


def _spec(cfg: NSAConfig) -> oracle.Spec:
    return oracle.Spec(
        cfg.block_size,
        cfg.cmp_block,
        cfg.cmp_stride,
        cfg.num_selected,
        cfg.window,
        cfg.videonsa_compat,
    )


def assert_gradients_match_differences(rng, cfg: NSAConfig, seg: np.ndarray, args: dict,
                                       params: dict | None = None) -> dict:
    """`jax.grad` (float32) of `sum(W * nsa_attention(...))` for a random `W`, along a random
    direction of each input (and of three MLP compression parameters), against central
    differences of the float64 oracle. Returns the inputs' gradients."""
    w = rng.standard_normal(args["q"].shape)

    def ours(a, p):
        o = nsa_attention(
            a["q"], a["k"], a["v"], a["gates"], cfg, segment_ids=seg, compress_params=p
        )
        return jnp.sum(o * w)

    f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
    grads, pgrads = jax.grad(ours, argnums=(0, 1))(f32(args), f32(params))

    def oracle_f(a, p):
        o, _ = oracle.nsa(a["q"], a["k"], a["v"], a["gates"], _spec(cfg), seg, p)
        return float(np.sum(o * w))

    checks = [(name, args, grads[name]) for name in args]
    if params is not None:
        checks += [(name, params, pgrads[name]) for name in ("k_w1", "v_w2", "k_pos")]
    for name, tree, grad in checks:
        u = rng.standard_normal(np.shape(tree[name]))
        plus = {**tree, name: tree[name] + EPS * u}
        minus = {**tree, name: tree[name] - EPS * u}
        if tree is args:
            fd = (oracle_f(plus, params) - oracle_f(minus, params)) / (2 * EPS)
        else:
            fd = (oracle_f(args, plus) - oracle_f(args, minus)) / (2 * EPS)
        got = float(np.sum(np.asarray(grad, np.float64) * u))
        assert abs(got - fd) <= 1e-4 * max(1.0, abs(fd)), (name, got, fd)
    return {name: np.asarray(g) for name, g in grads.items()}


@pytest.mark.parametrize("hq,hkv", [(2, 2), (7, 1), (16, 1)])
@pytest.mark.parametrize("compression", ["mean", "mlp"])
def test_gradients_match_oracle_differences(rng, hq, hkv, compression):
    cfg = NSAConfig(
        block_size=8,
        compress_block=8,
        compress_stride=4,
        num_selected=2,
        window=6,
        compression=compression,
    )
    seg = np.ones((B, T), np.int32)
    seg[:, 24:] = 2
    args = {
        "q": rng.standard_normal((B, T, hq, D)),
        "k": rng.standard_normal((B, T, hkv, D)),
        "v": rng.standard_normal((B, T, hkv, D)),
        "gates": rng.uniform(0.1, 0.9, (B, T, hq, 3)),
    }
    params = None
    if compression == "mlp":
        params = init_compress_params(jax.random.key(int(rng.integers(1 << 30))), cfg, D)
        params = {n: np.asarray(p) + 0.1 * rng.standard_normal(p.shape) for n, p in params.items()}
    assert_gradients_match_differences(rng, cfg, seg, args, params)


def test_gradients_where_queries_see_nothing_match_differences(rng):
    """Queries before the first complete block (no compressed block visible) and padding rows
    make no NaN: the gradients match the oracle's differences, and padding rows, which no
    query sees and which see nothing, get exactly zero."""
    cfg = NSAConfig(block_size=16, num_selected=2, window=4)
    t = 20
    args = {
        "q": rng.standard_normal((1, t, 4, D)),
        "k": rng.standard_normal((1, t, 2, D)),
        "v": rng.standard_normal((1, t, 2, D)),
        "gates": rng.uniform(0.1, 0.9, (1, t, 4, 3)),
    }
    seg = np.ones((1, t), np.int32)
    seg[:, 17:] = 0
    grads = assert_gradients_match_differences(rng, cfg, seg, args)
    for name in ("q", "k", "v", "gates"):
        np.testing.assert_array_equal(grads[name][:, 17:], 0.0, err_msg=f"d{name}")
