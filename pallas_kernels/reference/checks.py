"""Input validation shared by every attention entry point.

Errors are `ValueError`s that name the argument and say how to fix it, raised before any
tracing, so a user never has to decode a shape error from deep inside XLA. Only shapes and
dtypes are read, never values: a check must not break tracing (closed-over arrays become traced
values under `jax.jit`) nor wait for the device. NaN hunting is `jax_debug_nans`'s job.
"""

from __future__ import annotations

import jax
import numpy as np


def _shape(name: str, x: object) -> tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    return tuple(shape)


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int]:
    """Checks `q: [B, T, Hq, D]`, `k, v: [B, T, Hkv, D]`; returns (B, T, Hq, Hkv, D)."""
    qs, ks, vs = _shape("q", q), _shape("k", k), _shape("v", v)
    for name, s in (("q", qs), ("k", ks), ("v", vs)):
        if len(s) != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {s}")
    b, t, hq, d = qs
    if ks != vs:
        raise ValueError(f"k and v must have the same shape, got k {ks} and v {vs}")
    if ks[0] != b or ks[1] != t:
        raise ValueError(
            f"k {ks} must share batch and length with q {qs} (self-attention: [B, T, Hkv, D])"
        )
    if ks[3] != d:
        raise ValueError(f"k/v head dim {ks[3]} differs from q head dim {d}")
    hkv = ks[2]
    if t == 0:
        raise ValueError("q has zero length (T = 0): NSA needs at least one token")
    if min(b, hq, hkv, d) <= 0:
        raise ValueError(f"q {qs} and k {ks} must have positive batch, heads and head dim")
    if hq % hkv:
        raise ValueError(
            f"the number of query heads ({hq}) must be a multiple of the number of key/value "
            f"heads ({hkv}); e.g. 28 query heads over 4 KV heads"
        )
    return b, t, hq, hkv, d


def check_trailing(name: str, x: jax.Array, expected: tuple[int, ...]) -> None:
    """Checks that `x` has exactly the shape `expected`."""
    s = _shape(name, x)
    if s != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {s}")


def check_segment_ids(segment_ids: jax.Array | None, b: int, t: int) -> None:
    if segment_ids is None:
        return
    check_trailing("segment_ids", segment_ids, (b, t))
    if not np.issubdtype(np.dtype(segment_ids.dtype), np.integer):
        raise ValueError(f"segment_ids must be integer (0 = padding), got {segment_ids.dtype}")


def check_nsa_inputs(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array,
                     segment_ids: jax.Array | None) -> tuple[int, int, int, int, int]:
    """The arguments every NSA entry point takes: `(B, T, Hq, Hkv, D)` or a `ValueError`."""
    b, t, hq, hkv, d = check_qkv(q, k, v)
    check_trailing("gates", gates, (b, t, hq, 3))
    check_segment_ids(segment_ids, b, t)
    return b, t, hq, hkv, d


def check_positive(**sizes: int | None) -> None:
    for name, value in sizes.items():
        if value is None:
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
