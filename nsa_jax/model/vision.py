"""Qwen2.5-VL vision tower in Flax NNX, matching transformers' `Qwen2_5_VisionTransformer...`.

Flow (N patches, C = hidden):
  pixel_values `[N, 3*2*14*14]` -> patch embedding (the Conv3d with stride = kernel is a matmul
  on the flattened patch) `[N, C]` -> reorder so each attention window is contiguous ->
  blocks (window attention, or per-frame "full" attention at `fullatt_block_indexes`), each
  `x + attn(norm1(x))`, `x + mlp(norm2(x))` with 2D RoPE -> merger (RMSNorm, 2x2 patches
  concatenated, Linear-GELU-Linear) `[N/4, out]` -> undo the reordering.

The index arithmetic that depends on the grids (`VisionInputs`: the window partition and the
frame segments) is done in NumPy on the host: the grids fix the shapes anyway, and it keeps
the array function jit-able.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.config import VisionConfig
from nsa_jax.model import rope
from nsa_jax.model.layers import GatedMLP, RMSNorm, activation, linear
from pallas_kernels.numerics import NEG_INF

Array = jax.Array
QUERY_CHUNK = 1024  # queries per step of the segment attention (bounds the logits' memory)


def window_index(
    grid_thw: np.ndarray, merge: int, window_size: int, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Window partition of merged tokens, as transformers' `get_vision_window_index`.

    Returns `window_index: [N / merge^2]` (merged-token order after reordering, so each
    window is contiguous) and `window_seg: [N / merge^2]` (window id of each reordered merged
    token; windows never cross frames).
    """
    win = window_size // merge // patch_size
    index, seg = [], []
    offset, next_seg = 0, 0
    for t, h, w in np.asarray(grid_thw).tolist():
        gh, gw = h // merge, w // merge
        idx = np.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = -gh % win, -gw % win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t * nh * nw, win * win)
        for window in padded:
            keep = window[window >= 0]
            if keep.size:
                index.append(keep + offset)
                seg.append(np.full(keep.size, next_seg))
                next_seg += 1
        offset += t * gh * gw
    return np.concatenate(index), np.concatenate(seg)


def frame_segments(grid_thw: np.ndarray) -> np.ndarray:
    """`[N]` frame id of each patch: the "full attention" blocks attend within one frame."""
    sizes = [h * w for t, h, w in np.asarray(grid_thw).tolist() for _ in range(t)]
    return np.repeat(np.arange(len(sizes)), sizes)


@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Host-side index arrays for one call of the tower (all NumPy).

    Attributes:
      perm: `[N]` patch order after window reordering.
      inverse: `[N / merge^2]` merged-token order that undoes the reordering.
      window_seg: `[N]` window id per (reordered) patch.
      frame_seg: `[N]` frame id per (reordered) patch.
      pos_hw: `[N, 2]` (row, column) per (reordered) patch, for the 2D RoPE.
    """

    perm: np.ndarray
    inverse: np.ndarray
    window_seg: np.ndarray
    frame_seg: np.ndarray
    pos_hw: np.ndarray

    @classmethod
    def from_grid(cls, grid_thw: np.ndarray, cfg: VisionConfig) -> VisionInputs:
        grid = np.asarray(grid_thw).reshape(-1, 3).astype(np.int64)
        unit = cfg.spatial_merge_size**2
        win_idx, win_seg = window_index(
            grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
        )
        perm = (win_idx[:, None] * unit + np.arange(unit)).reshape(-1)
        pos = rope.vision_position_ids(grid, cfg.spatial_merge_size)
        return cls(
            perm=perm,
            inverse=np.argsort(win_idx),
            window_seg=np.repeat(win_seg, unit),
            frame_seg=frame_segments(grid)[perm],
            pos_hw=pos[perm],
        )


def segment_attention(q: Array, k: Array, v: Array, seg: Array) -> Array:
    """Bidirectional attention inside segments: `q, k, v: [N, H, D]`, `seg: [N]` -> `[N, H, D]`.

    f32 logits and softmax; maps over query chunks so no `[N, N]` matrix is built at once.
    The last chunk is padded with query rows of segment -1; they see no key, get a uniform
    (finite) softmax and are sliced off.
    """
    n, h, d = q.shape
    c = min(QUERY_CHUNK, n)
    pad = -n % c
    qp = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(-1, c, h, d)
    sp = jnp.pad(seg, (0, pad), constant_values=-1).reshape(-1, c)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    def chunk(args: tuple[Array, Array]) -> Array:
        qc, sc = args
        s = jnp.einsum("chd,nhd->hcn", qc.astype(jnp.float32), kf) * d**-0.5
        # finite, not -inf: the padding query rows of the last chunk match no key, and an
        # all -inf row has a NaN softmax that the backward pass would carry into dk and dv
        s = jnp.where((sc[:, None] == seg[None, :])[None], s, NEG_INF)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("hcn,nhd->chd", p, vf)

    o = jax.lax.map(chunk, (qp, sp)).reshape(-1, h, d)[:n]
    return o.astype(q.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.proj = linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.num_heads = cfg.num_heads

    def __call__(self, x: Array, cos: Array, sin: Array, seg: Array) -> Array:
        n = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, -1), 1, 0)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        return self.proj(segment_attention(q, k, v, seg).reshape(n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.hidden_act,
            bias=True,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, cos: Array, sin: Array, seg: Array) -> Array:
        x = x + self.attn(self.norm1(x), cos, sin, seg)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 block of patches concatenated and mapped to the LM width."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.mlp_0 = linear(width, width, bias=True, dtype=dtype, rngs=rngs)
        self.mlp_2 = linear(width, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.width = width

    def __call__(self, x: Array) -> Array:
        h = self.ln_q(x).reshape(-1, self.width)
        return self.mlp_2(activation("gelu", self.mlp_0(h)))


class PatchEmbed(nnx.Module):
    """The Conv3d patch embedding as a matmul: kernel `[3*2*14*14, C]`, no bias."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.proj = linear(cfg.patch_dim, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: Array) -> Array:
        return self.proj(pixels.astype(self.proj.kernel.dtype))


class VisionTower(nnx.Module):
    """`pixel_values: [N, patch_dim]` + `VisionInputs` -> merged features `[N/4, out_hidden]`."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, pixel_values: Array, inputs: VisionInputs) -> Array:
        cfg = self.cfg
        x = self.patch_embed(jnp.asarray(pixel_values)[jnp.asarray(inputs.perm)])
        cos, sin = rope.vision_cos_sin(jnp.asarray(inputs.pos_hw), cfg.head_dim, cfg.rope_theta)
        window_seg, frame_seg = jnp.asarray(inputs.window_seg), jnp.asarray(inputs.frame_seg)
        for i, block in enumerate(self.blocks):
            seg = frame_seg if i in cfg.fullatt_block_indexes else window_seg
            x = block(x, cos, sin, seg)
        return self.merger(x)[jnp.asarray(inputs.inverse)]
