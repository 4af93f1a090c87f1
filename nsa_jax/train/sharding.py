"""The device mesh and the one table of sharding rules.

One `Mesh` with the axes of `nsa_jax.axes` (`data`, `fsdp`, `tensor`, `sequence`, their names
and roles declared there). Every parameter gets logical axis
names from its path (`PARAM_AXES`), and `RULES` maps each logical axis to mesh axes, as
MaxText's `logical_axis_rules` do. A mesh axis is used only where it divides the dimension (and
at most once per array); otherwise that dimension stays replicated, so any model runs on any
mesh. The batch is sharded over (`data`, `fsdp`) and the tokens over `sequence` (context
parallelism: `attention/sequence_parallel.py` runs attention across the token shards); the
parameters over `fsdp` and `sequence` together (`STATE_AXES`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nsa_jax.axes import BATCH_AXES, HEAD_AXIS, MESH_AXES, STATE_AXES, TOKEN_AXIS
from nsa_jax.model.stacking import layer_template

# logical axis -> mesh axes, tried in order (MaxText's logical_axis_rules)
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("embed", STATE_AXES),
    ("vocab", (HEAD_AXIS,)),
    ("heads", (HEAD_AXIS,)),
    ("kv_heads", (HEAD_AXIS,)),
    ("mlp", (HEAD_AXIS,)),
    ("gate_hidden", (HEAD_AXIS,)),
    ("gates", ()),
    ("vision_embed", STATE_AXES),
    ("vision_heads", (HEAD_AXIS,)),
    ("vision_mlp", (HEAD_AXIS,)),
    ("merger", STATE_AXES),
    ("patch", ()),
    ("norm", ()),
    ("activation_length", (TOKEN_AXIS,)),  # the tokens of the batch and the activations
    ("layers", ()),  # the leading axis of stacked decoder layers: every chip holds every layer
)

# parameter path (our flat names, see convert/names.py) -> logical axes of its dimensions;
# the first matching pattern wins, and every parameter must match one (a stacked layer's by
# its first layer's name, after its leading `layers` axis: `model/stacking.py`)
PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"^language\.embed_tokens\.embedding$", ("vocab", "embed")),
    (r"^lm_head\.kernel$", ("embed", "vocab")),
    (r"\.self_attn\.q_proj\.kernel$", ("embed", "heads")),
    (r"\.self_attn\.q_proj\.bias$", ("heads",)),
    (r"\.self_attn\.[kv]_proj\.kernel$", ("embed", "kv_heads")),
    (r"\.self_attn\.[kv]_proj\.bias$", ("kv_heads",)),
    (r"\.self_attn\.o_proj\.kernel$", ("heads", "embed")),
    (r"\.self_attn\.g_proj_1\.kernel$", ("embed", "gate_hidden")),
    (r"\.self_attn\.g_proj_1\.bias$", ("gate_hidden",)),
    (r"\.self_attn\.g_proj_2\.kernel$", ("gate_hidden", "gates")),
    (r"\.self_attn\.g_proj_2\.bias$", ("gates",)),
    (r"^language\.layers\.\d+\.mlp\.(gate|up)_proj\.kernel$", ("embed", "mlp")),
    (r"^language\.layers\.\d+\.mlp\.down_proj\.kernel$", ("mlp", "embed")),
    (r"^language\..*norm\.weight$", ("norm",)),
    (r"^visual\.patch_embed\.proj\.kernel$", ("patch", "vision_embed")),
    (r"^visual\.blocks\.\d+\.attn\.qkv\.kernel$", ("vision_embed", "vision_heads")),
    (r"^visual\.blocks\.\d+\.attn\.qkv\.bias$", ("vision_heads",)),
    (r"^visual\.blocks\.\d+\.attn\.proj\.kernel$", ("vision_heads", "vision_embed")),
    (r"^visual\.blocks\.\d+\.attn\.proj\.bias$", ("vision_embed",)),
    (r"^visual\.blocks\.\d+\.mlp\.(gate|up)_proj\.kernel$", ("vision_embed", "vision_mlp")),
    (r"^visual\.blocks\.\d+\.mlp\.(gate|up)_proj\.bias$", ("vision_mlp",)),
    (r"^visual\.blocks\.\d+\.mlp\.down_proj\.kernel$", ("vision_mlp", "vision_embed")),
    (r"^visual\.blocks\.\d+\.mlp\.down_proj\.bias$", ("vision_embed",)),
    (r"^visual\.blocks\.\d+\.norm[12]\.weight$", ("norm",)),
    (r"^visual\.merger\.ln_q\.weight$", ("norm",)),
    (r"^visual\.merger\.mlp_0\.kernel$", ("merger", "vision_mlp")),
    (r"^visual\.merger\.mlp_0\.bias$", ("vision_mlp",)),
    (r"^visual\.merger\.mlp_2\.kernel$", ("vision_mlp", "embed")),
    (r"^visual\.merger\.mlp_2\.bias$", ("embed",)),
)


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """`"data=2,fsdp=4"` -> sizes of all four axes (unnamed ones 1; one may be -1: the rest).

    Raises:
      ValueError: unknown axis, bad size, or a product that is not `num_devices`.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    fill = None
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ValueError(f"mesh {spec!r}: {item!r} is not AXIS=SIZE with AXIS in {MESH_AXES}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh {spec!r}: size of {name} is not an integer") from None
        if size == -1:
            if fill is not None:
                raise ValueError(f"mesh {spec!r}: only one axis may be -1")
            fill = name
        elif size < 1:
            raise ValueError(f"mesh {spec!r}: {name}={size} must be >= 1 (or -1)")
        else:
            sizes[name] = size
    fixed = math.prod(v for k, v in sizes.items() if k != fill)
    if fill is not None:
        if num_devices % fixed:
            raise ValueError(f"mesh {spec!r}: {num_devices} devices are not a multiple of {fixed}")
        sizes[fill] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {spec!r} has {math.prod(sizes.values())} devices but {num_devices} are present"
        )
    return sizes


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `spec` over `devices` (default all, of every process), axes in `MESH_AXES`
    order. TPU chips are laid out by their physical coordinates (`mesh_utils`, as MaxText
    does), so that neighbours on a mesh axis are neighbours on the torus; other devices (and
    TPU shapes `mesh_utils` cannot map) in their listed order, which keeps each process's
    devices together."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices[0].platform == "tpu" and len(devices) > 1:
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            return Mesh(grid, MESH_AXES)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # a shape it has no physical layout for: the listed order still works
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def param_logical_axes(name: str, ndim: int) -> tuple[str, ...]:
    """Logical axes of parameter `name` (our flat path) from `PARAM_AXES`."""
    if layer_template(name) != name:
        return ("layers", *param_logical_axes(layer_template(name), ndim - 1))
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):
            if len(axes) != ndim:
                raise ValueError(f"sharding rule {pattern!r} names {len(axes)} axes; {name} "
                                 f"has {ndim}")
            return axes
    raise ValueError(f"no sharding rule for parameter {name!r}: add one to PARAM_AXES")


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
    rules: Sequence[tuple[str, tuple[str, ...]]] = RULES,
) -> PartitionSpec:
    """Mesh axes for each dimension: the rule's axes of size > 1 not used by an earlier
    dimension, dropped from the end until their product divides the dimension."""
    table = dict(rules)
    used: set[str] = set()
    out: list[tuple[str, ...] | None] = []
    for axis, dim in zip(axes, shape, strict=True):
        if axis is not None and axis not in table:
            raise ValueError(f"logical axis {axis!r} has no rule in RULES")
        cand = [m for m in table.get(axis, ()) if mesh.shape[m] > 1 and m not in used]
        while cand and dim % math.prod(mesh.shape[m] for m in cand):
            cand.pop()
        used.update(cand)
        out.append(tuple(cand) if cand else None)
    return PartitionSpec(*out)


def param_shardings(
    shapes: Mapping[str, Sequence[int]], mesh: Mesh
) -> dict[str, NamedSharding]:
    """`{name: NamedSharding}` for parameters of the given shapes."""
    return {
        name: NamedSharding(mesh, logical_to_spec(param_logical_axes(name, len(s)), s, mesh))
        for name, s in shapes.items()
    }


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over (`data`, `fsdp`), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def token_sharding(mesh: Mesh, shape: Sequence[int], token_axis: int) -> NamedSharding:
    """Batch over (`data`, `fsdp`) and dimension `token_axis` (tokens, or the patch slots
    that hold them) over `sequence` when it divides it; the rest replicated."""
    axes: list[str | None] = [None] * len(shape)
    axes[token_axis] = "activation_length"
    spec = list(logical_to_spec(axes, shape, mesh))
    spec[0] = BATCH_AXES  # as `batch_sharding`: the pipeline gives each shard its rows
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: `data * fsdp`."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
