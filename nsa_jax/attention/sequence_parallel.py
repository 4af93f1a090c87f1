"""Context parallelism: a layer's attention with the tokens sharded over the `sequence` axis.

Outside attention every op of a decoder layer is per token (projections, RoPE, gates, MLPs),
so GSPMD runs them on `[B, T/n, ...]` shards with no communication. Attention needs every
earlier key, and NSA's selection needs the compressed keys of the whole prefix, so here the
shards trade tokens for heads (Ulysses, DeepSpeed's and VideoNSA's sequence parallelism):

  1. inside `jax.shard_map`, one all-to-all per array turns q, k, v and the gate logits from
     `[B, T/n, H, D]` (sequence-sharded) into `[B, T, H/n, D]` (head-sharded), and the per-token
     `[B, T]` arrays the routing reads (`is_video`, `segment_ids`) are all-gathered;
  2. the unmodified attention runs on whole sequences of its heads (the routed hybrid layer:
     NSA on the video rows, dense flash attention on the gathered text rows; or dense);
  3. one all-to-all brings the output back to `[B, T/n, Hq, D]`.

A shard must hold whole GQA groups: NSA's block selection sums the importance over the G query
heads of a KV head, so splitting a group would change which blocks are selected. The head
degree is therefore `gcd(n, Hkv)`; when `n` has a factor `r` beyond it (n = 8 with Qwen's
4 KV heads), every shard all-gathers q, k, v over the whole axis instead, computes its
`Hq / (n / r)` heads over the whole sequence (each head group on `r` shards), and a
reduce-scatter over the axis returns each shard its tokens of every head (only one of the `r`
copies contributes, so the sum is exact). That fallback is correct at any degree but does not
split the attention work beyond `Hkv` ways; the rest of the layer still splits `n` ways.

With `sequence = 1` none of this runs (`LayerInputs.sequence_parallel` is None).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from nsa_jax.axes import BATCH_AXES, HEAD_AXIS, TOKEN_AXIS

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """Where the tokens are sharded: `mesh` (axes `nsa_jax.axes.MESH_AXES`), the token axis
    `axis`, the batch over `batch_axes` and the heads over `head_axis` (tensor parallelism;
    size 1 = unsplit); the roles of `nsa_jax.axes` by default. Hashable: a static field of
    `LayerInputs`."""

    mesh: Mesh | AbstractMesh
    axis: str = TOKEN_AXIS
    batch_axes: tuple[str, ...] = BATCH_AXES
    head_axis: str = HEAD_AXIS

    @classmethod
    def of(cls, mesh: Mesh | AbstractMesh) -> SequenceParallel | None:
        """The mesh's context parallelism, or None when its `sequence` axis has size 1."""
        return cls(mesh) if mesh.shape.get(TOKEN_AXIS, 1) > 1 else None

    @property
    def degree(self) -> int:
        return self.mesh.shape[self.axis]

    @property
    def tensor(self) -> int:
        return self.mesh.shape.get(self.head_axis, 1)

    def batch_spec(self, b: int) -> tuple[str, ...] | None:
        """The batch axes, when they divide a batch of `b` rows (else replicated)."""
        return self.batch_axes if b % math.prod(self.mesh.shape[a] for a in self.batch_axes) == 0 \
            else None

    def shard_tokens(self, x: Array, token_axis: int = 1, *, rows: bool = True) -> Array:
        """`x` pinned with dimension `token_axis` (tokens, or the patches that make them)
        over `axis` where the degree divides it, and with `rows` its leading dimension over
        the batch axes; every other dimension whole. Under `jax.vmap(...,
        spmd_axis_name=batch_axes)` (the vision tower, per row) pass `rows=False`: the
        mapped dimension takes the batch axes. A no-op for a dimension the degree does not
        divide (the constraint would be refused), which then stays whole."""
        spec: list[str | tuple[str, ...] | None] = [None] * x.ndim
        if rows:
            spec[0] = self.batch_spec(x.shape[0])
        if x.shape[token_axis] % self.degree == 0:
            spec[token_axis] = self.axis
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

    def head_degree(self, hq: int, hkv: int) -> int:
        """How many ways the all-to-all splits the heads: `gcd(n, Hkv / tensor)` (whole GQA
        groups per shard). Raises a ValueError naming the mesh and the heads when the heads
        cannot be laid out at all."""
        if hq % hkv or hkv % self.tensor:
            raise ValueError(
                f"mesh {dict(self.mesh.shape)}: {hq} query and {hkv} KV heads cannot be split "
                f"over tensor={self.tensor} with whole GQA groups per shard"
            )
        return math.gcd(self.degree, hkv // self.tensor)

    def check(self, hq: int, hkv: int, t: int) -> None:
        """Raises a ValueError when a `[B, t]` sequence of these heads cannot be sharded."""
        self.head_degree(hq, hkv)
        if t % self.degree:
            raise ValueError(
                f"mesh {dict(self.mesh.shape)}: {t} tokens do not split over "
                f"sequence={self.degree}"
            )


def sequence_parallel_attention(
    attend: Callable[..., Array],
    sp: SequenceParallel,
    q: Array,
    k: Array,
    v: Array,
    head_arrays: tuple[Array, ...] = (),
    token_arrays: tuple[Array | None, ...] = (),
) -> Array:
    """`attend(q, k, v, *head_arrays, *token_arrays)` on whole sequences, with every input
    sharded over `sp.axis` on its token axis (axis 1).

    Args:
      attend: attention on one shard's heads: `q: [B, T, hq, D]`, `k, v: [B, T, hkv, D]`,
        `head_arrays` `[B, T, hq, ...]` (e.g. the gate logits), `token_arrays` `[B, T]` (or
        None) -> `[B, T, hq, D]`, on one shard's local arrays (inside `shard_map`).
      q, k, v, head_arrays: global `[B, T, H, ...]` arrays (heads on axis 2).
      token_arrays: global `[B, T]` arrays (segment ids, the routing mask) or None.

    Returns `[B, T, Hq, D]`, sequence-sharded, equal to `attend` on the unsharded arrays.
    """
    b, t, hq, _ = q.shape
    hkv = k.shape[2]
    sp.check(hq, hkv, t)
    n, ax = sp.degree, sp.axis
    n_heads = sp.head_degree(hq, hkv)
    batch = sp.batch_spec(b)
    tensor = sp.head_axis if sp.tensor > 1 else None
    heads_spec = PartitionSpec(batch, ax, tensor)
    tok_spec = PartitionSpec(batch, ax)
    present = [x is not None for x in token_arrays]
    toks = tuple(x for x in token_arrays if x is not None)

    def whole_tokens(toks: tuple[Array, ...]) -> list[Array | None]:
        # [B, T/n] -> [B, T], the Nones back in their places
        it = iter([jax.lax.all_gather(x, ax, axis=1, tiled=True) for x in toks])
        return [next(it) if p else None for p in present]

    def ulysses(q: Array, k: Array, v: Array, heads: tuple[Array, ...],
                toks: tuple[Array, ...]) -> Array:
        def to_heads(x: Array) -> Array:  # [B, T/n, H, ...] -> [B, T, H/n, ...]
            return jax.lax.all_to_all(x, ax, split_axis=2, concat_axis=1, tiled=True)

        o = attend(to_heads(q), to_heads(k), to_heads(v), *map(to_heads, heads),
                   *whole_tokens(toks))
        return jax.lax.all_to_all(o, ax, split_axis=1, concat_axis=2, tiled=True)

    def gathered(q: Array, k: Array, v: Array, heads: tuple[Array, ...],
                 toks: tuple[Array, ...]) -> Array:
        # heads split n_heads ways; shard i computes head group i % n_heads over the whole
        # sequence (the n / n_heads shards of a group compute the same values)
        idx = jax.lax.axis_index(ax)
        group = idx % n_heads

        def my_heads(x: Array) -> Array:  # [B, T/n, H, ...] -> [B, T, H/n_heads, ...]
            x = jax.lax.all_gather(x, ax, axis=1, tiled=True)
            size = x.shape[2] // n_heads
            return jax.lax.dynamic_slice_in_dim(x, group * size, size, axis=2)

        o = attend(my_heads(q), my_heads(k), my_heads(v), *map(my_heads, heads),
                   *whole_tokens(toks))
        # one copy of each head group contributes to the reduce-scatter: an exact sum
        o = jnp.where(idx // n_heads == 0, o, jnp.zeros_like(o))
        size = o.shape[2]
        placed = jnp.zeros((*o.shape[:2], size * n_heads, *o.shape[3:]), o.dtype)
        placed = jax.lax.dynamic_update_slice_in_dim(placed, o, group * size, axis=2)
        return jax.lax.psum_scatter(placed, ax, scatter_dimension=1, tiled=True)

    body = ulysses if n_heads == n else gathered
    heads = tuple(head_arrays)
    fn = jax.shard_map(
        body,
        mesh=sp.mesh,
        in_specs=(heads_spec, heads_spec, heads_spec, (heads_spec,) * len(heads),
                  (tok_spec,) * len(toks)),
        out_specs=heads_spec,
        # the attention inside (Pallas kernels, custom_vjp flash attention) carries no
        # varying-axis annotations; the specs above are the contract
        check_vma=False,
    )
    return fn(q, k, v, heads, toks)
