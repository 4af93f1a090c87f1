"""Pallas call operands by name (`pallas_kernels.operands`): the output aliases follow the
operand list, so an operand added anywhere keeps every output on its own buffer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.operands import aliases, ordered
from pallas_kernels.tpu import block_sparse as bs


def accumulate(names: tuple[str, ...], **operands: jax.Array) -> jax.Array:
    """`acc + x * scale` written in place into the operand named `acc`, by a Pallas call
    (interpreted) whose operands are `names` in order."""

    def kernel(*refs):
        by_name = dict(zip(names, refs, strict=False))
        out = refs[-1]
        out[...] = by_name["acc"][...] + by_name["x"][...] * by_name["scale"][...]

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(operands["acc"].shape, jnp.float32),
        input_output_aliases=aliases(names, ("acc",)),
        interpret=True,
    )(*ordered(names, **operands))


def test_an_added_operand_keeps_the_alias_on_its_buffer() -> None:
    """The same call with one more operand before the accumulator (where a hand-counted
    index would now alias `extra`) gives the same result."""
    rng = np.random.default_rng(0)
    x, acc, scale, extra = (jnp.asarray(rng.standard_normal(8), jnp.float32) for _ in range(4))
    want = np.asarray(acc + x * scale)
    got = accumulate(("x", "scale", "acc"), x=x, scale=scale, acc=acc)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    grown = accumulate(("x", "scale", "extra", "acc"), x=x, scale=scale, extra=extra, acc=acc)
    np.testing.assert_allclose(grown, want, rtol=1e-6)
    assert aliases(("x", "scale", "acc"), ("acc",)) == {2: 0}
    assert aliases(("x", "scale", "extra", "acc"), ("acc",)) == {3: 0}


def test_operands_named_wrongly_are_refused() -> None:
    with pytest.raises(ValueError, match=r"missing \['acc'\], unknown \['ac'\]"):
        ordered(("x", "acc"), x=1, ac=2)
    with pytest.raises(ValueError, match=r"unknown: \['lse'\]"):
        aliases(("q", "o"), ("o", "lse"))


def test_the_tpu_kernels_alias_their_accumulators() -> None:
    """Each block-sparse call's outputs reuse its last operands (the zero-filled buffers)."""
    assert aliases(bs.FWD_OPERANDS, ("o", "lse")) == {9: 0, 10: 1}
    assert aliases(bs.DQ_OPERANDS, ("dq",)) == {10: 0}
    assert aliases(bs.DKV_OPERANDS, ("dk", "dv")) == {10: 0, 11: 1}
    assert aliases(bs.IMPORTANCE_OPERANDS, ("out",)) == {11: 0}
