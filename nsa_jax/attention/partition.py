"""Pallas NSA kernels inside a sharded program: one kernel call per shard.

XLA partitions a jitted program over a mesh by itself, but not a Pallas call (Mosaic on TPU,
Triton on GPU): it raises "Mosaic kernels cannot be automatically partitioned". `per_shard`
wraps a kernel backend so that, under a mesh context (`jax.set_mesh(mesh)` around the call
that traces the program, as `nsa_jax.train` does), the kernel runs under `jax.shard_map` on
each shard's rows: the batch axis over the mesh's (`data`, `fsdp`) axes and the KV heads
(with their query heads) over `tensor`, where those divide (the roles of `nsa_jax.axes`; a
mesh that splits an axis named elsewhere is refused rather than run unsharded). Rows and
KV-head groups are independent in NSA, so this is exact. The sequence stays whole on every
shard (context parallelism is `sequence_parallel.py`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from nsa_jax.axes import BATCH_AXES, HEAD_AXIS, MESH_AXES
from pallas_kernels.reference import NSAConfig, checks

Array = jax.Array
NSAFunction = Callable[..., Array]


def _axes(mesh: jax.sharding.AbstractMesh, names: tuple[str, ...], dim: int) -> tuple[str, ...]:
    """The mesh axes of `names` (present, size > 1, not already manual) whose product divides
    `dim`, dropped from the end until it does.

    Raises:
      ValueError: the mesh splits an axis that `nsa_jax.axes` does not name; the kernel would
        run whole (unsharded) over it.
    """
    split = [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in mesh.manual_axes]
    unknown = [a for a in split if a not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"mesh axes {unknown} of mesh {dict(mesh.shape)} have no role in nsa_jax.axes "
            f"{MESH_AXES}: name the mesh's axes from nsa_jax.axes (train.sharding.make_mesh)"
        )
    axes = [a for a in names if a in split]
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return tuple(axes)


def per_shard(fn: NSAFunction) -> NSAFunction:
    """`fn` (an NSA backend with `nsa_reference`'s signature) run per shard under the current
    mesh context, or directly when there is none (one device, or no `jax.set_mesh`) or when a
    surrounding shard_map made every axis manual."""

    @functools.wraps(fn)
    def sharded(q: Array, k: Array, v: Array, gates: Array, cfg: NSAConfig, *,
                segment_ids: Array | None = None,
                compress_params: dict[str, Array] | None = None) -> Array:
        mesh = jax.sharding.get_abstract_mesh()
        # inside a shard_map over every axis (the sequence-parallel layer) the arrays are one
        # shard's already: a nested shard_map over manual axes would be wrong in the backward
        # (a cotangent of the whole batch added to one of the shard's rows)
        if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
            return fn(q, k, v, gates, cfg, segment_ids=segment_ids,
                      compress_params=compress_params)
        # the specs below need well-formed inputs: checked here on the global arrays (the
        # kernel checks its shard's again)
        checks.check_nsa_inputs(q, k, v, gates, segment_ids)
        rows = _axes(mesh, BATCH_AXES, q.shape[0]) or None
        heads = _axes(mesh, (HEAD_AXIS,), k.shape[2]) or None
        per_head = P(rows, None, heads, None)  # q, k, v, gates and the output
        extra = {}  # the optional inputs that are given
        if segment_ids is not None:
            extra["segment_ids"] = (segment_ids, P(rows, None))
        if compress_params is not None:  # shared by every head and row
            extra["compress_params"] = (compress_params,
                                        jax.tree.map(lambda _: P(), compress_params))
        names = tuple(extra)

        def body(q: Array, k: Array, v: Array, gates: Array, *rest: object) -> Array:
            return fn(q, k, v, gates, cfg, **dict(zip(names, rest, strict=True)))

        specs = (per_head,) * 4 + tuple(spec for _, spec in extra.values())
        # check_vma=False: Pallas calls carry no varying-manual-axes annotations
        return jax.shard_map(body, in_specs=specs, out_specs=per_head, check_vma=False)(
            q, k, v, gates, *(x for x, _ in extra.values()))

    return sharded
