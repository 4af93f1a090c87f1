"""Tensors read only when needed: what lets conversion stream one tensor at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """A tensor that `load()` reads (from a safetensors shard, an orbax checkpoint, or an
    initialiser) when a writer reaches it, so a conversion holds one tensor at a time.

    Attributes:
      shape, dtype: what `load()` returns, known without reading it.
      load: returns the array (a new one each call).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def materialize(x: np.ndarray | LazyArray) -> np.ndarray:
    """The array itself: `x.load()` for a `LazyArray`, `x` otherwise."""
    return x.load() if isinstance(x, LazyArray) else np.asarray(x)
