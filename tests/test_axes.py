"""The mesh axis names in one home (`nsa_jax.axes`): the training mesh, the per-shard kernel
calls and context parallelism read the same names, and a kernel call under a mesh that splits
an axis with no role there is refused rather than run unsharded. Traced only: fast."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from nsa_jax import axes
from nsa_jax.attention.partition import per_shard
from nsa_jax.attention.sequence_parallel import SequenceParallel
from nsa_jax.train import sharding
from pallas_kernels.reference import NSAConfig, nsa_reference

CFG = NSAConfig(block_size=8, num_selected=2, window=8)
B, T, HQ, HKV, D = 4, 32, 4, 2, 16


def kernel_specs(mesh: AbstractMesh) -> tuple[P, ...]:
    """The in_specs of the shard_map that `per_shard` wraps the NSA call in, traced under
    `mesh` (its q, k, v and gates)."""
    q = jax.ShapeDtypeStruct((B, T, HQ, D), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, HKV, D), jnp.float32)
    g = jax.ShapeDtypeStruct((B, T, HQ, 3), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda *a: per_shard(nsa_reference)(*a, CFG))(q, kv, kv, g)
    (call,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    return call.params["in_specs"]


def test_the_training_mesh_and_context_parallelism_use_the_declared_names() -> None:
    mesh = sharding.make_mesh("")
    assert mesh.axis_names == axes.MESH_AXES
    assert set(axes.BATCH_AXES + axes.STATE_AXES + (axes.TOKEN_AXIS, axes.HEAD_AXIS)) <= set(
        axes.MESH_AXES
    )
    sp = SequenceParallel(AbstractMesh((1, 1, 1, 2), axes.MESH_AXES))
    assert (sp.axis, sp.batch_axes, sp.head_axis) == (
        axes.TOKEN_AXIS,
        axes.BATCH_AXES,
        axes.HEAD_AXIS,
    )


def test_a_kernel_call_splits_rows_over_the_batch_axes_and_kv_heads_over_the_head_axis() -> None:
    mesh = AbstractMesh((2, 2, 2, 1), axes.MESH_AXES)
    rows_heads = P(axes.BATCH_AXES, None, (axes.HEAD_AXIS,), None)
    assert kernel_specs(mesh) == (rows_heads,) * 4


@pytest.mark.parametrize("names", [("batch", "model"), (axes.DATA, "model")])
def test_a_kernel_call_under_a_mesh_with_an_unknown_axis_is_refused(names: tuple) -> None:
    """Renaming an axis on one side only (here `model` for `tensor`) used to leave the kernel
    whole over it, silently; now the call names the axis and the fix."""
    with pytest.raises(ValueError, match=r"'model'\].*no role in nsa_jax.axes"):
        kernel_specs(AbstractMesh((2, 2), names))


def test_an_unknown_axis_of_size_one_splits_nothing_and_is_accepted() -> None:
    assert (
        kernel_specs(AbstractMesh((2, 1), (axes.DATA, "model")))
        == (P((axes.DATA,), None, None, None),) * 4
    )


def test_the_axes_module_is_on_the_bottom_floor() -> None:
    """`nsa_jax/axes.py` imports nothing from nsa_jax, so any room can import it."""
    tree = ast.parse(Path(axes.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "nsa_jax"]
