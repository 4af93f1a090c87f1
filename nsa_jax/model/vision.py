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

Attention in O(N): windows and frames are contiguous runs of patches after the reordering, so
each is gathered into a row of a `[segments, longest, H, D]` batch (`SegmentLayout`) and
attended as a batch of short sequences, the padding keys cut by their lengths: O(N x window)
for the window blocks, O(N x frame) for the full-attention blocks, never an `[N, N]` array.
On a GPU with 16-bit inputs that batch runs through cuDNN's fused attention, else XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.attention.sequence_parallel import SequenceParallel
from nsa_jax.config import VisionConfig
from nsa_jax.model import rope, scopes
from nsa_jax.model.layers import (
    GatedMLP,
    RMSNorm,
    activation,
    checkpointed,
    linear,
    same_runs,
    scan_modules,
)

Array = jax.Array
#: pins a per-row patch array (`[N, ...]`, or the segment batch `[S, L, ...]`) to its sharding
#: along the leading axis: the sequence axis under context parallelism, else the identity
Shard = Callable[[Array], Array]


def _whole(x: Array) -> Array:
    return x


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
class SegmentLayout:
    """Contiguous segments of `N` patches laid out as rows of a `[S, L]` batch (host NumPy).

    Attributes:
      gather: `[S, L]` patch index of each slot (`N` in padding slots: an appended zero row).
      scatter: `[N]` flat slot (`row * L + column`) of each patch.
      lengths: `[S]` patches per segment.
    """

    gather: np.ndarray
    scatter: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_segments(cls, seg: np.ndarray) -> SegmentLayout:
        """`seg: [N]` segment id per patch, each segment one contiguous run."""
        seg = np.asarray(seg)
        n = seg.size
        starts = np.flatnonzero(np.concatenate([[True], seg[1:] != seg[:-1]]))
        lengths = np.diff(np.append(starts, n))
        longest = int(lengths.max())
        col = np.arange(longest)
        gather = np.where(col < lengths[:, None], starts[:, None] + col, n)
        row = np.repeat(np.arange(starts.size), lengths)
        scatter = row * longest + (np.arange(n) - starts[row])
        return cls(gather.astype(np.int32), scatter.astype(np.int32), lengths.astype(np.int32))

    @classmethod
    def empty(cls) -> SegmentLayout:
        """No patches (a batch row without video)."""
        return cls(np.zeros((0, 1), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))

    def padded(self, slots: int, rows: int, longest: int) -> SegmentLayout:
        """The layout of these `N` patches inside `slots >= N` patch slots, as a static
        `[rows, longest]` batch (the training step's shapes): extra rows gather only the zero
        row (index `slots`) with length 1, so they stay finite; the `slots - N` padding
        patches read slot 0, whose value they never pass on (their features are not used).
        A layout padded so (`N == slots`) widens the same way (hosts agreeing on a shape)."""
        s, length = self.gather.shape
        n = self.scatter.size
        if s > rows or (s and length > longest) or n > slots:
            raise ValueError(
                f"segment layout of {s} segments x {length} patches ({n} patches) does not fit "
                f"{rows} x {longest} ({slots} slots)"
            )
        gather = np.full((rows, longest), slots, np.int32)
        gather[:s, :length] = np.where(self.gather == n, slots, self.gather)
        seg_row, col = np.divmod(self.scatter, max(length, 1))
        scatter = np.zeros(slots, np.int32)
        scatter[:n] = seg_row * longest + col
        lengths = np.ones(rows, np.int32)
        lengths[:s] = self.lengths
        return SegmentLayout(gather, scatter, lengths)


jax.tree_util.register_dataclass(
    SegmentLayout, data_fields=["gather", "scatter", "lengths"], meta_fields=[]
)


@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Host-side index arrays for one call of the tower (all NumPy).

    Attributes:
      perm: `[N]` patch order after window reordering.
      inverse: `[N / merge^2]` merged-token order that undoes the reordering.
      window: the attention windows of the (reordered) patches.
      frame: the frames of the (reordered) patches (the full-attention blocks).
      pos_hw: `[N, 2]` (row, column) per (reordered) patch, for the 2D RoPE.
    """

    perm: np.ndarray
    inverse: np.ndarray
    window: SegmentLayout
    frame: SegmentLayout
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
            window=SegmentLayout.from_segments(np.repeat(win_seg, unit)),
            frame=SegmentLayout.from_segments(frame_segments(grid)[perm]),
            pos_hw=pos[perm],
        )


    def padded(
        self, slots: int, window: tuple[int, int], frame: tuple[int, int], unit: int
    ) -> VisionInputs:
        """These inputs inside `slots` patch slots with static layout shapes `window` and
        `frame` (`(rows, longest)`; `SegmentLayout.padded`): the padding patches follow the
        real ones, in order, at position (0, 0), so the real merged features come first.
        `unit` is the merge size squared."""
        n = self.perm.size
        return VisionInputs(
            perm=np.concatenate([self.perm, np.arange(n, slots)]).astype(np.int32),
            inverse=np.concatenate(
                [self.inverse, np.arange(n // unit, slots // unit)]).astype(np.int32),
            window=self.window.padded(slots, *window),
            frame=self.frame.padded(slots, *frame),
            pos_hw=np.concatenate(
                [self.pos_hw, np.zeros((slots - n, 2), self.pos_hw.dtype)]).astype(np.int32),
        )

    @classmethod
    def empty(cls) -> VisionInputs:
        """No patches (a batch row without video)."""
        none = np.zeros(0, np.int32)
        return cls(none, none, SegmentLayout.empty(), SegmentLayout.empty(),
                   np.zeros((0, 2), np.int32))


jax.tree_util.register_dataclass(
    VisionInputs, data_fields=["perm", "inverse", "window", "frame", "pos_hw"], meta_fields=[]
)


def segment_attention(q: Array, k: Array, v: Array, layout: SegmentLayout,
                      shard: Shard = _whole) -> Array:
    """Bidirectional attention inside contiguous segments: `q, k, v: [N, H, D]` -> `[N, H, D]`.

    Each segment is gathered into a row of `[S, L, H, D]` (`layout`), attended with the keys
    past its length cut off, and scattered back: O(N x L) work and memory. `shard` pins the
    segment batch and the output along their leading axis (whole segments per shard: the
    gathers move patches between shards, the attention itself stays local).
    """
    n, h, d = q.shape

    def rows(x: Array) -> Array:
        return shard(jnp.concatenate([x, jnp.zeros((1, h, d), x.dtype)])[layout.gather])

    gpu16 = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    o = jax.nn.dot_product_attention(
        rows(q), rows(k), rows(v), key_value_seq_lengths=layout.lengths,
        implementation="cudnn" if gpu16 else "xla",
    )
    return shard(shard(o).reshape(-1, h, d)[layout.scatter])


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.proj = linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.num_heads = cfg.num_heads

    def __call__(self, x: Array, cos: Array, sin: Array, seg: SegmentLayout,
                 shard: Shard = _whole) -> Array:
        n = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, -1), 1, 0)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        return self.proj(segment_attention(q, k, v, seg, shard).reshape(n, -1))


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

    def __call__(self, x: Array, cos: Array, sin: Array, seg: SegmentLayout,
                 shard: Shard = _whole) -> Array:
        x = shard(x + self.attn(self.norm1(shard(x)), cos, sin, seg, shard))
        return shard(x + self.mlp(self.norm2(x)))


def run_block(block: VisionBlock, x: Array, cos: Array, sin: Array, seg: SegmentLayout,
              shard: Shard = _whole) -> Array:
    return block(x, cos, sin, seg, shard)


def run_blocks(blocks: Sequence[VisionBlock], x: Array, cos: Array, sin: Array,
               window: SegmentLayout, frame: SegmentLayout, *, full: Sequence[bool], scan: bool,
               remat: bool, shard: Shard = _whole) -> Array:
    """`x: [N, hidden]` through `blocks`: those marked `full` attend within a frame, the
    others within a window; each rematerialised when `remat`, runs of alike blocks scanned
    when `scan`; every block's activations pinned by `shard`."""
    if scan:
        policy = jax.checkpoint_policies.nothing_saveable if remat else None
        for run in same_runs(full):
            seg = frame if full[run.start] else window
            x = scan_modules([blocks[i] for i in run], x,
                             lambda block, h, seg=seg: block(h, cos, sin, seg, shard), policy)
        return x
    step = functools.partial(run_block, shard=shard)
    for block, f in zip(blocks, full, strict=True):
        seg = frame if f else window
        x = checkpointed(block, step, x, cos, sin, seg) if remat else step(
            block, x, cos, sin, seg)
    return x


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 block of patches concatenated and mapped to the LM width."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, dtype=dtype)
        self.mlp_0 = linear(width, width, bias=True, dtype=dtype, rngs=rngs)
        self.mlp_2 = linear(width, cfg.out_hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.width = width

    def __call__(self, x: Array, shard: Shard = _whole) -> Array:
        h = shard(self.ln_q(x).reshape(-1, self.width))
        return shard(self.mlp_2(activation("gelu", self.mlp_0(h))))


class PatchEmbed(nnx.Module):
    """The Conv3d patch embedding as a matmul: kernel `[3*2*14*14, C]`, no bias."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.proj = linear(cfg.patch_dim, cfg.hidden_size, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: Array) -> Array:
        return self.proj(pixels.astype(self.proj.kernel.dtype))


class VisionTower(nnx.Module):
    """`pixel_values: [N, patch_dim]` + `VisionInputs` -> merged features `[N/4, out_hidden]`.
    `remat` ("block", "tower" or None, `ModelConfig.vision_remat`): each block is
    rematerialised in the backward pass (nothing saved), and with "tower" the blocks together
    as well (only their input is saved); with `scan`, each run of window blocks (and each
    full-attention block) is one `lax.scan`."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 remat: Literal["block", "tower"] | None = None, scan: bool = False) -> None:
        self.cfg = cfg
        self.remat = remat
        self.scan = scan
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, dtype=dtype, rngs=rngs)

    @jax.named_scope(scopes.VISION)  # its ops by part in a step profile (train/profile.py)
    def __call__(self, pixel_values: Array, inputs: VisionInputs,
                 sequence_parallel: SequenceParallel | None = None) -> Array:
        """`sequence_parallel`: shard every patch activation over the `sequence` axis (one
        row's; call under `jax.vmap(..., spmd_axis_name=sequence_parallel.batch_axes)` for a
        batch of rows). Without it nothing pins the patches, and propagation from the token
        shards stops at the gathers (`perm`, the segment layouts), leaving every chip of a
        row the whole tower."""
        cfg = self.cfg
        shard: Shard = _whole
        if sequence_parallel is not None:
            shard = functools.partial(sequence_parallel.shard_tokens, token_axis=0, rows=False)
        x = shard(self.patch_embed(shard(jnp.asarray(pixel_values)[jnp.asarray(inputs.perm)])))
        cos, sin = rope.vision_cos_sin(jnp.asarray(inputs.pos_hw), cfg.head_dim, cfg.rope_theta)
        cos, sin = shard(cos), shard(sin)
        window, frame = jax.tree.map(jnp.asarray, (inputs.window, inputs.frame))
        run = functools.partial(
            run_blocks, full=[i in cfg.fullatt_block_indexes for i in range(len(self.blocks))],
            scan=self.scan, remat=self.remat is not None, shard=shard)
        if self.remat == "tower":
            x = checkpointed(self.blocks, run, x, cos, sin, window, frame)
        else:
            x = run(self.blocks, x, cos, sin, window, frame)
        return shard(self.merger(x, shard)[jnp.asarray(inputs.inverse)])
