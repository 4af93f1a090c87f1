"""Block lists built in XLA for the block-sparse kernels of both backends."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
EMPTY = jnp.iinfo(jnp.int32).max  # sorts after every block index


def distinct_ascending(raw: Array) -> tuple[Array, Array]:
    """The distinct non-negative entries of each row of `raw [..., M]` (-1 = none, duplicates
    allowed), ascending and then `EMPTY`: `([..., M] int32, count [...] int32)`."""
    s = jnp.sort(jnp.where(raw < 0, EMPTY, raw), axis=-1)
    dup = jnp.concatenate([jnp.zeros_like(s[..., :1], bool), s[..., 1:] == s[..., :-1]], -1)
    s = jnp.sort(jnp.where(dup, EMPTY, s), axis=-1)
    return s.astype(jnp.int32), (s < EMPTY).sum(-1).astype(jnp.int32)
