"""Ahead-of-time compilation of the TPU kernels for real TPU chips, on any host.

libtpu describes a TPU slice without one (`jax.experimental.topologies.get_topology_desc`);
`jax.jit(f).lower(args placed on its devices).compile()` then runs libtpu's own compiler,
XLA:TPU and Mosaic, which rejects what would not fit a chip: scalar prefetch past SMEM, blocks
past the scoped VMEM limit, buffers past HBM. `memory_analysis()` gives the compiled HBM use
and `cost_analysis()` XLA's FLOPs and bytes (each Pallas call counts its `CostEstimate`).
Set `JAX_PLATFORMS=cpu` so that JAX does not look for a chip to run on.

`NSACase` names one compiled program: a branch (`BRANCHES`) forward, or forward and backward,
at one shape; `compile_case` compiles it for a generation and reports `CompileStats`. The
tests (`tests/test_tpu_compile.py`) and `experiments/tpu_compile.py` share them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from pallas_kernels._compat import compiling_for_tpu
from pallas_kernels.reference import NSAConfig, init_compress_params
from pallas_kernels.tpu.compressed import compressed_attention, select_blocks
from pallas_kernels.tpu.dense import dense_attention
from pallas_kernels.tpu.nsa import nsa_attention
from pallas_kernels.tpu.selected import selected_attention
from pallas_kernels.tpu.window import sliding_window_attention

Array = jax.Array
# the smallest slice libtpu describes per generation (one host); cases compile for one chip
TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}  # per chip
__all__ = ["compiling_for_tpu"]  # re-exported: the switch for programs lowered onto a slice
BRANCHES = ("nsa", "compressed", "selection", "selected", "window", "dense")


def libtpu_missing() -> str | None:
    """Why TPU programs cannot be compiled here, or None when libtpu is installed."""
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed: pip install 'jax[tpu]' (the dev extra has it)"
    return None


@functools.cache
def devices(generation: str) -> tuple:
    """The TPU devices of `generation`'s smallest slice (`TOPOLOGIES`), from libtpu alone."""
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGIES[generation])
    return tuple(desc.devices)


def generation_of(topology: str) -> str:
    """`"v5p:4x4x4"` -> `"v5p"` (a key of `HBM_BYTES`).

    Raises:
      ValueError: not `GENERATION:AxB[xC]` with a generation libtpu and `HBM_BYTES` know.
    """
    gen, sep, dims = topology.partition(":")
    if not sep or gen not in HBM_BYTES or not all(d.isdigit() for d in dims.split("x")):
        raise ValueError(f"topology {topology!r} is not GENERATION:AxB[xC] with GENERATION in "
                         f"{sorted(HBM_BYTES)} (e.g. v5e:2x2, v5p:4x4x4, v6e:8x8)")
    return gen


@functools.cache
def topology_devices(topology: str) -> tuple:
    """Every chip of a whole TPU slice (`"v5p:4x4x4"`: 64 chips, 16 hosts), from libtpu alone.

    Hosts hold 2 x 2 x 1 chips, as on Cloud TPU VMs; v4 and v5p run their two TensorCores
    as one device (megacore); 3D slices of 4 chips or more on every side and 2D slices of
    16 x 16 close their torus (wrap-around links), as the Cloud slices of those shapes do. The
    wrap-around changes collective routes, not the compiled memory.
    """
    from jax.experimental import topologies

    gen = generation_of(topology)
    dims = [int(d) for d in topology.split(":")[1].split("x")]
    if len(dims) == 3:
        wrap = (all(d >= 4 for d in dims),) * 3
    else:
        wrap = (dims == [16, 16],) * 2 + (False,)
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology,
        chip_config_name="megacore" if gen in ("v4", "v5p") else "default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=wrap,
    )  # fmt: skip
    return tuple(desc.devices)


@dataclasses.dataclass(frozen=True)
class CompileStats:
    """One compiled program on one chip: HBM = arguments + outputs + temporaries - aliased."""

    generation: str
    compile_s: float
    hbm_bytes: int
    temp_bytes: int
    flops: float | None
    bytes_accessed: float | None


def compile_stats(fn: Callable, args: tuple, generation: str) -> CompileStats:
    """Compiles `jax.jit(fn)(*args)` (args: ShapeDtypeStructs placed on `generation`'s devices)
    with libtpu; raises what the compiler raises (e.g. RESOURCE_EXHAUSTED past SMEM or HBM)."""
    start = time.perf_counter()
    # splash traces its matmuls at the configured precision (see `dense`); the test suite's
    # "highest" would ask Mosaic for f32 products of bf16 tiles
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
    hbm = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    return CompileStats(
        generation,
        round(seconds, 2),
        int(hbm),
        int(mem.temp_size_in_bytes),
        cost.get("flops"),
        cost.get("bytes accessed"),
    )


@dataclasses.dataclass(frozen=True)
class NSACase:
    """One program to compile: `branch` of `BRANCHES` at `q [B, T, Hq, D]`, `k, v [B, T, Hkv,
    D]` bf16 with packed-segment ids `[B, T]`, forward only or forward and backward (the
    gradient of `sum(o)` in every float input; the selection has no backward).

    `mesh` > 1 shards batch rows and KV heads over a `(data, heads)` mesh of that many chips
    each way with `shard_map` (per-chip shapes `B / mesh`, `Hkv / mesh`)."""

    t: int
    b: int = 1
    hq: int = 28
    hkv: int = 4
    d: int = 128
    cfg: NSAConfig = NSAConfig()
    branch: str = "nsa"
    backward: bool = True
    mesh: int = 1

    def __post_init__(self) -> None:
        if self.branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {self.branch!r}")

    @property
    def name(self) -> str:
        c = self.cfg
        parts = [
            self.branch, "fwd+bwd" if self.backward else "fwd", f"T{self.t}", f"B{self.b}",
            f"{self.hq}/{self.hkv}", f"D{self.d}", f"l{c.block_size}",
        ]  # fmt: skip
        if c.compression != "mean":
            parts.append(c.compression)
        if c.videonsa_compat:
            parts.append("compat")
        if self.mesh > 1:
            parts.append(f"mesh{self.mesh}x{self.mesh}")
        return " ".join(parts)


def _program(case: NSACase) -> tuple[Callable, dict[str, jax.ShapeDtypeStruct], tuple[str, ...]]:
    """`(fn(**inputs) -> array, input shapes, names of the differentiable inputs)`."""
    b, t, hq, hkv, d, cfg = case.b, case.t, case.hq, case.hkv, case.d, case.cfg
    nc = cfg.num_cmp_blocks(t)

    def s(*shape: int, dtype=jnp.bfloat16) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    q, kv, seg = s(b, t, hq, d), s(b, t, hkv, d), s(b, t, dtype=jnp.int32)
    kf = dict(interpret=False)
    if case.branch == "nsa":
        shapes = dict(q=q, k=kv, v=kv, gates=s(b, t, hq, 3), seg=seg)
        if cfg.compression == "mlp":
            shapes["params"] = jax.eval_shape(
                lambda: init_compress_params(jax.random.key(0), cfg, d, jnp.bfloat16)
            )

        def fn(q, k, v, gates, seg, params=None):
            return nsa_attention(
                q, k, v, gates, cfg, segment_ids=seg, compress_params=params, **kf
            )

        diff = tuple(n for n in shapes if n != "seg")
    elif case.branch == "compressed":
        shapes = dict(q=q, k_cmp=s(b, nc, hkv, d), v_cmp=s(b, nc, hkv, d), seg=seg)

        def fn(q, k_cmp, v_cmp, seg):
            return compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=seg, **kf)[0]

        diff = ("q", "k_cmp", "v_cmp")
    elif case.branch == "selection":
        shapes = dict(q=q, k_cmp=s(b, nc, hkv, d), lse=s(b, t, hq, dtype=jnp.float32), seg=seg)

        def fn(q, k_cmp, lse, seg):
            return select_blocks(q, k_cmp, lse, cfg, segment_ids=seg, **kf)

        diff = ()
    elif case.branch == "selected":
        shapes = dict(q=q, k=kv, v=kv, idx=s(b, t, hkv, cfg.num_selected, dtype=jnp.int32),
                      seg=seg)  # fmt: skip

        def fn(q, k, v, idx, seg):
            return selected_attention(q, k, v, idx, cfg, segment_ids=seg, **kf)

        diff = ("q", "k", "v")
    elif case.branch == "window":
        shapes = dict(q=q, k=kv, v=kv, seg=seg)

        def fn(q, k, v, seg):
            return sliding_window_attention(q, k, v, cfg.window, segment_ids=seg, **kf)

        diff = ("q", "k", "v")
    else:
        shapes = dict(q=q, k=kv, v=kv, seg=seg)

        def fn(q, k, v, seg):
            return dense_attention(q, k, v, seg, **kf)

        diff = ("q", "k", "v")
    return fn, shapes, diff


def _spec(name: str, x: jax.ShapeDtypeStruct) -> PartitionSpec:
    """Batch rows over `data` and KV heads (with their query heads) over `heads`; the
    compression MLP, shared by every head, replicated."""
    if name == "params":
        return PartitionSpec()
    if name == "seg":
        return PartitionSpec("data")
    return PartitionSpec("data", None, "heads", *([None] * (x.ndim - 3)))


def case_program(case: NSACase, generation: str) -> tuple[Callable, tuple]:
    """The function to compile and its arguments placed on `generation`'s chips (`NSACase`)."""
    fn, shapes, diff = _program(case)
    names = list(shapes)
    devs = devices(generation)
    specs = {n: jax.tree.map(lambda x, n=n: _spec(n, x), shapes[n]) for n in names}
    if case.mesh > 1:
        m = case.mesh
        if len(devs) < m * m:
            raise ValueError(f"{generation}'s slice has {len(devs)} chips, the mesh needs {m * m}")
        mesh = jax.sharding.Mesh([list(devs[i * m : (i + 1) * m]) for i in range(m)],
                                 ("data", "heads"))  # fmt: skip

        def sharding(spec: PartitionSpec):
            return NamedSharding(mesh, spec)
    else:

        def sharding(spec: PartitionSpec):
            return SingleDeviceSharding(devs[0])

    placed = {
        n: jax.tree.map(
            lambda x, p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(p)),
            shapes[n], specs[n],
        )  # fmt: skip
        for n in names
    }

    def forward(*args):
        return fn(**dict(zip(names, args, strict=True)))

    if case.mesh > 1:  # o [B, T, Hq, D] and idx [B, T, Hkv, n] split like q
        forward = jax.shard_map(
            forward, mesh=mesh, in_specs=tuple(specs[n] for n in names),
            out_specs=PartitionSpec("data", None, "heads"), check_vma=False,
        )  # fmt: skip
    if not (case.backward and diff):
        return forward, tuple(placed[n] for n in names)

    def loss(*args):
        return forward(*args).astype(jnp.float32).sum()

    grad = jax.value_and_grad(loss, argnums=tuple(names.index(n) for n in diff))
    return grad, tuple(placed[n] for n in names)


def compile_case(case: NSACase, generation: str) -> CompileStats:
    """Compiles `case` for one `generation` (`TOPOLOGIES`) through libtpu."""
    program, args = case_program(case, generation)
    return compile_stats(program, args, generation)


def sweep_cases(generations: tuple[str, ...] = tuple(TOPOLOGIES)) -> list[tuple[str, NSACase]]:
    """The compile sweep of `docs/tpu_roofline.md`: `(generation, case)` pairs, cheapest and
    most telling first (a full sweep compiles for hours on a small host, so a partial run
    keeps the best).

    A covering design, not a cross product: from the Qwen2.5-VL-7B shape (28/4 heads, D 128,
    VideoNSA's setting, B = 1) each axis of the issue moves one at a time, and every value
    compiles on every generation at 128K tokens forward and backward (tiles, VMEM limits and
    MXU widths differ per generation, so a value proven on one chip is not proven on
    another): D 64, GQA 1 (8/8 heads) and 16 (16/1), selection blocks 16, 32 and 128, B = 2,
    the MLP compression, `videonsa_compat` and dense (splash) attention with segment ids and
    GQA 7. The forward also at 256K, and the base shape at 8K and 32K (the ladder of the plot).
    B = 2 at 128K forward+backward and the 256K forward of all 28 heads exceed one v5e's
    16 GiB (the 128K B = 1 program takes 13.9), so on v5e those shard batch and KV heads over
    a 2x2 mesh (per chip B = 1, 2 KV heads); v5p and v6e take them on one chip.
    """
    long = 131072
    gens = ("v5e", "v6e", "v5p")  # the tightest HBM first

    def b2(gen: str, t: int, backward: bool) -> NSACase:
        return NSACase(t, b=2, backward=backward, mesh=2 if gen == "v5e" else 1)

    def fwd_256k(gen: str) -> NSACase:
        return b2(gen, 2 * long, False) if gen == "v5e" else NSACase(2 * long, backward=False)

    axes = (
        lambda g: NSACase(long, hq=16, hkv=1),
        lambda g: NSACase(long, hq=8, hkv=8),
        lambda g: NSACase(long, d=64),
        *(lambda g, blk=blk: NSACase(long, cfg=NSAConfig(block_size=blk)) for blk in (128, 32, 16)),
        lambda g: b2(g, long, True),
        lambda g: NSACase(long, cfg=NSAConfig(compression="mlp")),
        lambda g: NSACase(long, cfg=NSAConfig(videonsa_compat=True)),
    )
    cases = [(g, NSACase(long)) for g in gens]
    cases += [(g, NSACase(long, branch="dense")) for g in gens]
    cases += [(g, axis(g)) for g in gens for axis in axes]
    cases += [(g, fwd_256k(g)) for g in gens]
    cases += [(g, NSACase(t)) for t in (8192, 32768) for g in gens]
    return [(g, c) for g, c in cases if g in generations]
