"""Wrapper-side layouts for the block-sparse kernels (see `block_sparse` for the shapes).

Queries become GQA-group rows `[B, Hkv, Nq, block_q * G, Dp]`; keys and values become tiles
`[B, Hkv, Nk, K, Dp]`. Padding (time, tile, head dim) is zeros with segment 0, so the mask
hides it and the inverse maps simply drop it. Head dims are padded to a multiple of 64 lanes
(zeros change neither `q . k` nor the kept output columns).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.numerics import cdiv, round_up

Array = jax.Array


def padded_head_dim(d: int) -> int:
    return d if d % 64 == 0 else round_up(d, 64)


def q_rows(q: Array, hkv: int, block_q: int, dp: int) -> Array:
    """`[B, T, Hq, D]` -> `[B, Hkv, Nq, block_q * G, Dp]`, row = token * G + head-in-group."""
    b, t, hq, d = q.shape
    nq, g = cdiv(t, block_q), hq // hkv
    q = jnp.pad(q, [(0, 0), (0, nq * block_q - t), (0, 0), (0, dp - d)])
    q = q.reshape(b, nq, block_q, hkv, g, dp).transpose(0, 3, 1, 2, 4, 5)
    return q.reshape(b, hkv, nq, block_q * g, dp)


def from_rows(x: Array, t: int, hq: int, d: int) -> Array:
    """Inverse of `q_rows`: `[B, Hkv, Nq, R, W]` -> `[B, T, Hq, d]` (drops padding)."""
    b, hkv, nq, r, w = x.shape
    g = hq // hkv
    x = x.reshape(b, hkv, nq, r // g, g, w).transpose(0, 2, 3, 1, 4, 5)
    return x.reshape(b, nq * (r // g), hq, w)[:, :t, :, :d]


def q_meta(seg: Array, pos: Array, block_q: int, g: int) -> tuple[Array, Array]:
    """Row segments `[B, Nq, R, 1]` (padding 0) and row positions `[Nq, R, 1]` from per-token
    `seg [B, T]` and `pos [T]`."""
    b, t = seg.shape
    nq = cdiv(t, block_q)
    seg = jnp.pad(seg.astype(jnp.int32), [(0, 0), (0, nq * block_q - t)])
    pos = jnp.pad(pos.astype(jnp.int32), [(0, nq * block_q - t)])
    seg = jnp.repeat(seg.reshape(b, nq, block_q), g, axis=-1)[..., None]
    pos = jnp.repeat(pos.reshape(nq, block_q), g, axis=-1)[..., None]
    return seg, pos


def idx_rows(idx: Array, block_q: int, g: int) -> Array:
    """Selection per row: `[B, T, Hkv, n]` -> `[B, Hkv, Nq, block_q * G, n]` (padding -1)."""
    b, t, hkv, n = idx.shape
    nq = cdiv(t, block_q)
    idx = jnp.pad(idx, [(0, 0), (0, nq * block_q - t), (0, 0), (0, 0)], constant_values=-1)
    idx = idx.reshape(b, nq, block_q, hkv, n).transpose(0, 3, 1, 2, 4)
    return jnp.repeat(idx, g, axis=3)


def kv_tiles(x: Array, tile: int, tile_pad: int, dp: int) -> Array:
    """`[B, N, Hkv, D]` -> `[B, Hkv, Nk, tile_pad, Dp]` (tile `j` holds keys `[j*tile, ...)`)."""
    b, n, hkv, d = x.shape
    nk = cdiv(n, tile)
    x = jnp.pad(x, [(0, 0), (0, nk * tile - n), (0, 0), (0, dp - d)])
    x = x.reshape(b, nk, tile, hkv, dp).transpose(0, 3, 1, 2, 4)
    return jnp.pad(x, [(0, 0)] * 3 + [(0, tile_pad - tile), (0, 0)])


def k_meta(seg: Array, pos: Array, tile: int, tile_pad: int) -> tuple[Array, Array]:
    """Key segments `[B, Nk, 1, K]` and positions `[Nk, 1, K]` from per-key `seg [B, N]`,
    `pos [N]`; padding keys get segment 0 (never visible)."""
    b, n = seg.shape
    nk = cdiv(n, tile)
    seg = jnp.pad(seg.astype(jnp.int32), [(0, 0), (0, nk * tile - n)]).reshape(b, nk, tile)
    pos = jnp.pad(pos.astype(jnp.int32), [(0, nk * tile - n)]).reshape(nk, tile)
    seg = jnp.pad(seg, [(0, 0), (0, 0), (0, tile_pad - tile)])
    pos = jnp.pad(pos, [(0, 0), (0, tile_pad - tile)])
    return seg[:, :, None, :], pos[:, None, :]
