"""`nsa-jax tpu-compile`: the train step of a config compiled for a TPU slice, on any host.

As MaxText's `train_compile.py`: libtpu describes the slice (`pallas_kernels.tpu.aot.
topology_devices`, no TPU needed), the config's mesh is laid over its chips, and the real
`Trainer` functions of `nsa_jax.train.step` are lowered with abstract arguments
(`jax.ShapeDtypeStruct`s carrying the shardings a run gives them: the train state, the f32
gradient sum, one micro-batch of the config's longest rows) and compiled by libtpu's XLA:TPU.
No weight is ever materialised, so a 7B model on a 256-chip slice compiles on a laptop.

A step is `accumulate` (forward and backward of one micro-batch, added into the gradient sum;
once per micro-batch) then `apply` (clip, AdamW, skip if non-finite). Both keep the state and
the gradient sum resident, so the step's HBM per chip is the larger of the two programs'
`arguments + outputs + temporaries - aliased` (donated buffers are aliased).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

GIB = 1 << 30
PREFILL_LENGTH = 1 << 20  # an hour of video at 2 fps is ~920K tokens

DESCRIPTION = """\
Compiles the sharded train step of a config for a TPU slice with libtpu's ahead-of-time
compiler on this host (no TPU needed; weights are never created) and prints the HBM each
chip needs against its capacity. Exits 0 when the step fits, 1 when it does not (or does
not compile), 2 for a bad argument.

  --topology TOPOLOGY    GENERATION:AxB[xC] with GENERATION v4, v5e, v5p or v6e, e.g.
                         v5e:2x2, v5p:4x4x4 (64 chips), v6e:8x8 (64 chips)
  --config NAME_OR_YAML  as for `nsa-jax train` (tiny, videonsa-7b-36k, ...)
  key=value              config overrides, e.g. mesh=data=4,fsdp=16 per_shard_batch=1

The micro-batch is per_shard_batch x data x fsdp rows of the config's longest bucket
(data.bucket_lengths; --length to choose another), each one video of 224 x 224 frames
filling 90% of the row, a little text and --answer-tokens answer tokens.

With --prefill: the long prefill of one prompt of --length tokens (default 1,048,576, an
hour of video at 2 fps) instead: each kind of decoder layer with the tokens over the mesh's
`sequence` axis, the vision tower's chunk, and the weights and KV cache resident beside
them (e.g. --config videonsa-7b-36k --topology v5p:2x2x2 mesh=sequence=8).
See docs/training.md ("Checking a TPU slice").
"""


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """One compiled program's memory per chip (`compiled.memory_analysis()`), in bytes."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @classmethod
    def of(cls, compiled: Any) -> ProgramMemory:
        m = compiled.memory_analysis()
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                   int(m.generated_code_size_in_bytes))


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What `compile_train_step` found (all sizes per chip, bytes)."""

    config: str
    topology: str
    chips: int
    hosts: int
    device_kind: str
    mesh: dict[str, int]
    rows: int
    length: int
    answer_tokens: int
    text_rows: int | None
    grad_accum: int
    accumulate: ProgramMemory
    apply: ProgramMemory
    hbm_capacity: int
    compile_s: float

    @property
    def peak(self) -> int:
        """The step's HBM per chip: the larger program (both hold the state and the sums)."""
        return max(self.accumulate.total, self.apply.total)

    @property
    def fits(self) -> bool:
        return self.peak <= self.hbm_capacity

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(peak_bytes=self.peak, fits=self.fits,
                   accumulate_total=self.accumulate.total, apply_total=self.apply.total)
        return out

    def table(self) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"{self.config} on {self.topology}: {self.chips} chips ({self.device_kind}, "
            f"{self.hosts} host{'s' if self.hosts > 1 else ''}), mesh {mesh}",
            f"micro-batch: {self.rows} rows x {self.length} tokens ({self.answer_tokens} answer "
            f"slots, {self.text_rows} text-row slots a row), "
            f"{self.grad_accum} micro-batch{'es' if self.grad_accum > 1 else ''} "
            f"a step; compiled in {self.compile_s:.0f} s",
            "",
            f"{'HBM per chip (GiB)':<22}{'accumulate':>12}{'apply':>12}",
        ]
        for label, key in (("arguments", "arguments"), ("outputs", "outputs"),
                           ("aliased (donated)", "aliased"), ("temporaries", "temporaries"),
                           ("total", "total")):
            a, b = getattr(self.accumulate, key), getattr(self.apply, key)
            lines.append(f"{label:<22}{a / GIB:>12.2f}{b / GIB:>12.2f}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines += ["", f"step peak {self.peak / GIB:.2f} GiB of {self.hbm_capacity / GIB:.1f} GiB "
                  f"per chip ({100 * self.peak / self.hbm_capacity:.0f}%): {verdict}"]
        return "\n".join(lines)


def batch_spec(cfg: Any, rows: int, length: int, answers: int, mesh: Any, *,
               video_fraction: float = 0.9) -> Any:
    """The `ModelBatch` of `rows` rows of `length` tokens as `ShapeDtypeStruct`s sharded as
    `Trainer.put_batch` shards a real one (`step.batch_leaf_sharding`: leading axis over
    `data`, `fsdp`; the token arrays and the patch slots also over `sequence`).

    The shapes (and the static text-row slots) are those `batch.model_batch` gives a real row
    of VideoNSA's kind: one video of 224 x 224 frames filling `video_fraction` of the row,
    a little text, and `answers` answer tokens (`batch.synthetic_batch`); only one such row
    is made, on the host, and its shapes repeated for every row.
    """
    import jax

    from nsa_jax.data.config import numpy_dtype
    from nsa_jax.train.batch import model_batch, synthetic_batch
    from nsa_jax.train.step import batch_leaf_sharding

    raw = synthetic_batch(cfg.model, 1, length, video_fraction=video_fraction,
                          answer_tokens=answers, frame_patches=(16, 16),
                          pixel_dtype=numpy_dtype(cfg.data.pixel_dtype))
    one = model_batch(raw, cfg.model)
    def spec(path: tuple[Any, ...], x: Any) -> jax.ShapeDtypeStruct:
        shape = (rows, *np.shape(x)[1:])
        return jax.ShapeDtypeStruct(shape, np.asarray(x).dtype,
                                    sharding=batch_leaf_sharding(mesh, path, shape))

    return jax.tree_util.tree_map_with_path(spec, one)


def compile_train_step(cfg: Any, topology: str, *, length: int | None = None,
                       answer_tokens: int = 1024) -> CompileReport:
    """Compiles `cfg`'s `Trainer.accumulate` and `Trainer.apply` for `topology` with libtpu.

    `cfg.model.attention.implementation="auto"` becomes "pallas_tpu" (the backend a TPU run picks),
    and the TPU kernels are traced compiled, not interpreted (`compiling_for_tpu`).

    Raises:
      ValueError: a bad topology or a mesh that does not cover the slice's chips.
      Exception: what libtpu's compiler raises (e.g. a kernel past VMEM or SMEM).
    """
    import jax
    import jax.numpy as jnp

    from nsa_jax.train import sharding
    from nsa_jax.train.loss import answer_bucket
    from nsa_jax.train.step import Trainer
    from pallas_kernels.tpu import aot

    gen = aot.generation_of(topology)
    devices = aot.topology_devices(topology)
    if cfg.model.attention.implementation == "auto":
        cfg = dataclasses.replace(
            cfg, model=cfg.model.with_attention(implementation="pallas_tpu"))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rows = cfg.per_shard_batch * sharding.batch_shards(mesh)
    length = max(cfg.data.bucket_lengths) if length is None else length
    # the answer is at most an eighth of the row: the rest holds the video and the prompt
    answers = answer_bucket(min(answer_tokens, max(1, length // 8)), length)
    batch = batch_spec(cfg, rows, length, answers, mesh)  # on the host, before the compiles
    start = time.perf_counter()
    # under the mesh: the Pallas kernels run per shard (`nsa_jax.attention.partition`)
    with aot.compiling_for_tpu(), jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        trainer = Trainer.build(cfg, mesh)
        state = trainer.abstract_state()
        sums = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                           sharding=x.sharding), state.params)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
        acc = trainer.accumulate.lower(state, sums, batch).compile()
        app = trainer.apply.lower(state, sums, scalar, scalar).compile()
    return CompileReport(
        config=cfg.name, topology=topology, chips=len(devices),
        hosts=len({d.process_index for d in devices}), device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape), rows=rows, length=length,
        answer_tokens=batch.loss_positions.shape[1], text_rows=batch.text_rows,
        grad_accum=cfg.grad_accum, accumulate=ProgramMemory.of(acc),
        apply=ProgramMemory.of(app), hbm_capacity=aot.HBM_BYTES[gen],
        compile_s=round(time.perf_counter() - start, 1),
    )


@dataclasses.dataclass(frozen=True)
class PrefillReport:
    """What `compile_prefill` found (sizes per chip, bytes).

    The prefill runs one decoder layer at a time (`nsa_jax.prefill`): while the last layer
    runs, every other layer's weights and cache are resident beside that layer's program, so
    the peak is `resident + max(program)` with `resident` = all weights (embedding, tower,
    head included) less one layer's, plus every other layer's cache."""

    config: str
    topology: str
    chips: int
    device_kind: str
    mesh: dict[str, int]
    length: int
    text_rows: int
    programs: dict[str, ProgramMemory]
    weights: int
    layer_weights: int
    cache_layer: int
    layers: int
    hbm_capacity: int
    compile_s: float

    @property
    def resident(self) -> int:
        return self.weights - self.layer_weights + (self.layers - 1) * self.cache_layer

    @property
    def peak(self) -> int:
        return self.resident + max(p.total for p in self.programs.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.hbm_capacity

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(resident_bytes=self.resident, peak_bytes=self.peak, fits=self.fits)
        return out

    def table(self) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"{self.config} prefill on {self.topology}: {self.chips} chips ({self.device_kind}),"
            f" mesh {mesh}",
            f"one prompt of {self.length} tokens ({self.text_rows} text-row slots), the tokens "
            f"over `sequence`; {self.layers} layers one at a time; compiled in "
            f"{self.compile_s:.0f} s",
            "",
            f"{'HBM per chip (GiB)':<28}" + "".join(f"{n:>14}" for n in self.programs),
        ]
        for label, key in (("arguments", "arguments"), ("outputs", "outputs"),
                           ("aliased (donated)", "aliased"), ("temporaries", "temporaries"),
                           ("program total", "total")):
            lines.append(f"{label:<28}" + "".join(
                f"{getattr(p, key) / GIB:>14.2f}" for p in self.programs.values()))
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines += [
            "",
            f"{'weights (all, per chip)':<28}{self.weights / GIB:>14.2f}",
            f"{'KV cache a layer':<28}{self.cache_layer / GIB:>14.2f}",
            f"{'resident beside a layer':<28}{self.resident / GIB:>14.2f}",
            "",
            f"prefill peak {self.peak / GIB:.2f} GiB of {self.hbm_capacity / GIB:.1f} GiB per "
            f"chip ({100 * self.peak / self.hbm_capacity:.0f}%): {verdict}",
        ]
        return "\n".join(lines)


def compile_prefill(cfg: Any, topology: str, *, length: int,
                    video_fraction: float = 0.97) -> PrefillReport:
    """Compiles the long prefill's programs (`nsa_jax.prefill`) of `cfg.model` for `topology`
    with libtpu: each kind of decoder layer (hybrid, dense) over one prompt of `length`
    tokens sharded over the mesh's `sequence` axis (one chunk a shard, Ulysses attention),
    and the vision tower over one chunk of 448 x 448 frames (`VISION_PATCHES`, replicated).
    Weights in the compute dtype, sharded by the training rules (`train/sharding.py`); the
    cache in bf16 on token shards.

    Raises:
      ValueError: a bad topology, a mesh that does not cover the slice, or tokens that do not
        split over `sequence`.
      Exception: what libtpu's compiler raises.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nsa_jax.attention.hybrid import text_row_bucket
    from nsa_jax.attention.sequence_parallel import SequenceParallel
    from nsa_jax.axes import TOKEN_AXIS
    from nsa_jax.generate import cache_length
    from nsa_jax.model.language import LayerInputs
    from nsa_jax.model.vision import VisionInputs
    from nsa_jax.model.vlm import Qwen25VL
    from nsa_jax.prefill import VISION_PATCHES, jit_prefill_layer, jit_tower
    from nsa_jax.train import sharding
    from nsa_jax.train.step import leaf_name
    from pallas_kernels.tpu import aot

    gen = aot.generation_of(topology)
    devices = aot.topology_devices(topology)
    model_cfg = cfg.model
    if model_cfg.attention.implementation == "auto":
        model_cfg = model_cfg.with_attention(implementation="pallas_tpu")
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sp = SequenceParallel.of(mesh)
    t = model_cfg.text
    if sp is not None:
        sp.check(t.num_attention_heads, t.num_key_value_heads, length)
    dtype = jnp.dtype(cfg.compute_dtype)
    # the per-layer layout: the prefill runs one layer at a time (stacked runs are sliced)
    model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    model = nnx.eval_shape(lambda: Qwen25VL(model_cfg, dtype=dtype, rngs=nnx.Rngs(0)))

    def per_chip(x: Any) -> int:
        return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize

    def sharded_state(module: Any, prefix: str) -> tuple[Any, Any]:
        graphdef, state = nnx.split(module)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
        specs = []
        for path, leaf in leaves:
            name = prefix + leaf_name(path)
            spec = sharding.logical_to_spec(
                sharding.param_logical_axes(name, leaf.ndim), leaf.shape, mesh)
            specs.append(jax.ShapeDtypeStruct(leaf.shape, dtype,
                                              sharding=jax.NamedSharding(mesh, spec)))
        return graphdef, jax.tree.unflatten(treedef, specs)

    _, whole = sharded_state(model, "")
    weights = sum(per_chip(x) for x in jax.tree.leaves(whole))
    # one prompt: its tokens over `sequence`, nothing over the batch axes (fsdp shards weights)
    tokens = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(None, TOKEN_AXIS))
    rows = jax.NamedSharding(mesh, jax.sharding.PartitionSpec(None, TOKEN_AXIS, None))
    text = text_row_bucket(length - int(video_fraction * length), length)
    li = LayerInputs(
        cos=jax.ShapeDtypeStruct((1, length, t.head_dim), jnp.float32, sharding=rows),
        sin=jax.ShapeDtypeStruct((1, length, t.head_dim), jnp.float32, sharding=rows),
        segment_ids=None,
        is_video=jax.ShapeDtypeStruct((1, length), jnp.bool_, sharding=tokens),
        text_rows=text, sequence_parallel=sp,
    )
    x = jax.ShapeDtypeStruct((1, length, t.hidden_size), dtype, sharding=rows)
    cache_len = cache_length(length, 256)
    programs: dict[str, ProgramMemory] = {}
    layer_weights = 0
    start = time.perf_counter()
    with aot.compiling_for_tpu(), jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        for i, layer in enumerate(model.language.layers):
            kind = "hybrid layer" if model_cfg.uses_nsa(i) else "dense layer"
            if kind in programs:
                continue
            graphdef, state = sharded_state(layer, f"language.layers.{i}.")
            layer_weights = max(layer_weights, sum(per_chip(w) for w in jax.tree.leaves(state)))
            compiled = jit_prefill_layer.lower(graphdef, state, x, li, cache_len,
                                               jnp.dtype(jnp.bfloat16), length).compile()
            programs[kind] = ProgramMemory.of(compiled)
        vc = model_cfg.vision
        side = 448 // vc.patch_size
        chunk = (VISION_PATCHES // side**2, side, side)
        graphdef, state = sharded_state(model.visual, "visual.")
        rep = sharding.replicated(mesh)
        inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                                             sharding=rep),
                              VisionInputs.from_grid(np.asarray([chunk]), vc))
        pixels = jax.ShapeDtypeStruct((math.prod(chunk), vc.patch_dim), jnp.float32,
                                      sharding=rep)
        programs["vision chunk"] = ProgramMemory.of(
            jit_tower.lower(graphdef, state, pixels, inputs).compile())
    cache = jax.ShapeDtypeStruct((1, cache_len, t.num_key_value_heads, t.head_dim),
                                 jnp.bfloat16, sharding=jax.NamedSharding(
                                     mesh, jax.sharding.PartitionSpec(None, TOKEN_AXIS)))
    return PrefillReport(
        config=cfg.name, topology=topology, chips=len(devices),
        device_kind=devices[0].device_kind, mesh=dict(mesh.shape), length=length,
        text_rows=text, programs=programs, weights=weights, layer_weights=layer_weights,
        cache_layer=2 * per_chip(cache), layers=t.num_hidden_layers,
        hbm_capacity=aot.HBM_BYTES[gen], compile_s=round(time.perf_counter() - start, 1),
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tpu-compile",
        help="compile the train step for a TPU slice on this host; print HBM per chip",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--topology", required=True, metavar="TOPOLOGY")
    p.add_argument("--config", required=True, metavar="NAME_OR_YAML")
    p.add_argument("--length", type=int, metavar="T",
                   help="tokens per row (default: the config's longest bucket)")
    p.add_argument("--answer-tokens", type=int, default=1024, metavar="K",
                   help="answer (loss) slots per row, rounded up to a power of two "
                        "(default 1024)")
    p.add_argument("--prefill", action="store_true",
                   help="compile the long prefill (nsa_jax/prefill.py) of one prompt of "
                        "--length tokens (default 1,048,576) instead of the train step; the "
                        "tokens over the mesh's `sequence` axis")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import jax

    # the chips are described, not used: JAX must not look for a TPU (nor wait for one); the
    # flag, not the environment variable, since jax read its environment when imported
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another compiling process
    from nsa_jax.train.config import load_config
    from pallas_kernels.tpu import aot

    missing = aot.libtpu_missing()
    if missing:
        print(f"nsa-jax tpu-compile: {missing}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        aot.generation_of(args.topology)
    except ValueError as e:
        print(f"nsa-jax tpu-compile: {e}", file=sys.stderr)
        return 2
    try:
        if args.prefill:
            report = compile_prefill(cfg, args.topology, length=args.length or PREFILL_LENGTH)
        else:
            report = compile_train_step(cfg, args.topology, length=args.length,
                                        answer_tokens=args.answer_tokens)
    except ValueError as e:
        print(f"nsa-jax tpu-compile: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the compiler's verdict (e.g. RESOURCE_EXHAUSTED) is the answer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"nsa-jax tpu-compile: {cfg.name} does not compile for {args.topology}: "
              f"{type(e).__name__}: {first[:1000]}", file=sys.stderr)
        if args.json:
            _write_json(args.json, {"config": cfg.name, "topology": args.topology,
                                    "mesh": cfg.mesh, "fits": False, "compiled": False,
                                    "error": f"{type(e).__name__}: {first[:2000]}"})
        return 1
    print(report.table())
    if args.json:
        _write_json(args.json, {**report.to_json(), "compiled": True, "prefill": args.prefill})
    if not report.fits:
        what = "prefill" if args.prefill else "step"
        print(f"nsa-jax tpu-compile: the {what} needs {report.peak / GIB:.2f} GiB per chip, "
              f"more than the {report.hbm_capacity / GIB:.0f} GiB of a {args.topology} chip; "
              "shard more (mesh=, e.g. fsdp over more chips), shorten rows, or use a larger "
              "slice", file=sys.stderr)
        return 1
    return 0


def _write_json(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=lambda x: x if not isinstance(x, float)
                  or math.isfinite(x) else None)
        f.write("\n")
