"""Numeric helpers shared by the reference and every kernel backend: one home for each."""

from __future__ import annotations

# A finite stand-in for -inf in masked logits: `exp(NEG_INF - m)` underflows to 0 and the
# gradients stay NaN-free, which a true -inf would not guarantee (inf - inf).
NEG_INF = -1e30


def cdiv(a: int, b: int) -> int:
    """`ceil(a / b)` for positive `b` (Python ints or traced integer arrays)."""
    return -(-a // b)


def round_up(x: int, m: int) -> int:
    """The smallest multiple of `m` that is `>= x`."""
    return cdiv(x, m) * m
