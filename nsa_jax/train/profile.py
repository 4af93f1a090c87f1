"""One optimiser step's device time by part, from a `jax.profiler` trace and the compiled
programs' HLO (`experiments/bench_train.py --profile`).

Each op the device ran is named in the trace (`hlo_op`, `hlo_module` stats, or the event name);
the compiled HLO text gives that op's opcode, its `op_name` metadata (the JAX name stack, with
the named scopes the model sets: `nsa_jax.model.scopes`) and its matmul FLOPs (dots, cuBLAS
GEMM calls, the dots inside a fusion). An op goes to the first part that claims it:

- `collectives`: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute;
- `optimizer`: every op of the `apply` program (clipping, AdamW, the update);
- `vision_fwd` / `vision_bwd` / `vision_recompute`: under the `vision` scope, by phase (the
  name stack holds `transpose(` in the backward pass, `rematted_computation` for a forward op
  recomputed there);
- `lm_attention`: the `attention` scope inside the `language` scope (the attention kernels;
  the projections around them are not in it);
- `lm_proj_mlp`: the rest of the `language` scope (projections, gates, MLPs, norms);
- `loss`: the `loss` scope (LM head matmuls in chunks, cross-entropy);
- `other`: the rest (embedding, feature scatter, gradient sums);
- `idle`: the step's span on the device minus the union of its ops' intervals.

Containers (while, call, conditional) are skipped: their bodies' ops are counted themselves.
Achieved TFLOP/s of a part is its matmul FLOPs over its device time; a Pallas or Triton
kernel's FLOPs are not visible in HLO (custom calls), so the attention part also carries the
model's count of its FLOPs (`nsa_jax.train.flops`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nsa_jax.model import scopes

PARTS = (
    "vision_fwd",
    "vision_bwd",
    "vision_recompute",
    "lm_attention",
    "lm_proj_mlp",
    "loss",
    "optimizer",
    "collectives",
    "other",
    "idle",
)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
CONTAINERS = ("while", "call", "conditional")
OPTIMIZER_MODULE = "apply"


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of a compiled module: opcode, JAX name stack, matmul FLOPs per run."""

    opcode: str
    op_name: str
    flops: float


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPERANDS = re.compile(r"%([\w.\-]+)")


def _split_shape(rhs: str) -> tuple[str, str]:
    """`f32[2,3]{1,0} dot(...)` -> (`f32[2,3]{1,0}`, `dot(...)`); tuple shapes too."""
    if rhs.startswith("("):
        depth = 0
        for i, c in enumerate(rhs):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rhs[: i + 1], rhs[i + 1 :].lstrip()
    shape, _, rest = rhs.partition(" ")
    return shape, rest


def _dims(shape: str) -> list[int]:
    """The dimensions of the first array shape in `shape` (`f32[2,3]{1,0}` -> [2, 3])."""
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _contracting(rest: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", rest)
    if m:
        return [int(d) for d in m.group(1).split(",") if d]
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)  # cuBLAS backend config
    return [int(d.strip('" ')) for d in m.group(1).split(",") if d.strip('" ')] if m else []


def parse_hlo(text: str) -> dict[str, HloOp]:
    """`{instruction name: HloOp}` of the instructions a compiled module's text
    (`compiled.as_text()`) runs one by one (a fusion's inner instructions are not: the fusion's
    FLOPs are those of the dots of the computation it calls)."""
    shapes: dict[str, str] = {}
    raw: list[tuple[str, str, str, str]] = []  # name, computation, opcode, rest
    comp = ""
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and " = " not in line:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rhs = m.groups()
        shape, rest = _split_shape(rhs)
        shapes[name] = shape
        opcode = rest.split("(", 1)[0].strip()
        raw.append((name, comp, opcode, rest))
    own: dict[str, float] = {}
    by_comp: dict[str, float] = {}
    for name, comp, opcode, rest in raw:
        flops = 0.0
        gemm = opcode == "custom-call" and "gemm" in rest.split("custom_call_target=", 1)[-1][:60]
        if opcode == "dot" or gemm:
            args = rest.split("(", 1)[1].split(")", 1)[0]
            # `dot(f32[2,3]{1,0} %a, ...)` compiled; `dot(a, b)` lowered (`as_text(dialect="hlo")`)
            operands = _OPERANDS.findall(args) if "%" in args else args.split(", ")
            if operands and operands[0] in shapes:
                lhs = _dims(shapes[operands[0]])
                k = math.prod(
                    lhs[d] for d in _contracting(rest, "lhs_contracting_dims") if d < len(lhs)
                )
                flops = 2.0 * math.prod(_dims(shapes[name])) * k
        own[name] = flops
        by_comp[comp] = by_comp.get(comp, 0.0) + flops
    calls = {
        name: re.search(r"calls=%?([\w.\-]+)", rest)
        for name, _, opcode, rest in raw
        if opcode == "fusion"
    }
    fused = {m.group(1) for m in calls.values() if m}
    # a called computation's names are relative to its caller's in lowered (not yet inlined)
    # HLO: each is read under the name of the `call` that runs it
    own_name = {
        name: m.group(1) if (m := re.search(r'op_name="([^"]*)"', rest)) else ""
        for name, _, _, rest in raw
    }
    caller = {
        m.group(1): (name, comp)
        for name, comp, opcode, rest in raw
        if opcode == "call" and (m := re.search(r"to_apply=%?([\w.\-]+)", rest))
    }

    def full_name(name: str, comp: str) -> str:
        if comp not in caller:
            return own_name[name]
        return f"{full_name(*caller[comp])}/{own_name[name]}"

    out = {}
    for name, comp, opcode, _ in raw:
        if comp in fused:  # run as part of its fusion, never alone
            continue
        flops = own[name]
        if opcode == "fusion":
            flops = by_comp.get(calls[name].group(1), 0.0) if calls[name] else 0.0
        out[name] = HloOp(opcode, full_name(name, comp), flops)
    return out


def part_of(module: str, op: HloOp) -> str:
    """The part (`PARTS`) an op of program `module` belongs to."""
    if op.opcode.split("-start")[0].split("-done")[0] in COLLECTIVES:
        return "collectives"
    if OPTIMIZER_MODULE in module:
        return "optimizer"

    def within(scope: str) -> bool:  # `vision/...`, or `transpose(jvp(vision))/...`
        return re.search(rf"\b{scope}\b", op.op_name) is not None

    if within(scopes.VISION):
        if "rematted_computation" in op.op_name:
            return "vision_recompute"
        return "vision_bwd" if "transpose(" in op.op_name else "vision_fwd"
    if within(scopes.LANGUAGE):
        return "lm_attention" if within(scopes.ATTENTION) else "lm_proj_mlp"
    if within(scopes.LOSS):
        return "loss"
    return "other"


@dataclasses.dataclass(frozen=True)
class DeviceOp:
    """One op run on the device, from the trace."""

    module: str
    name: str
    start_ns: float
    duration_ns: float


def trace_ops(trace_dir: Path) -> list[DeviceOp]:
    """The ops of the first device in the trace under `trace_dir` (its "XLA Ops" line; on a
    host without an accelerator, the host events that name an HLO op)."""
    from jax.profiler import ProfileData

    for path in sorted(Path(trace_dir).rglob("*.xplane.pb")):
        planes = list(ProfileData.from_file(str(path)).planes)
        # devices that ran XLA ops (libtpu adds an empty device plane on any host)
        device = sorted(
            (
                p
                for p in planes
                if p.name.startswith("/device:") and any(ln.name == "XLA Ops" for ln in p.lines)
            ),
            key=lambda p: p.name,
        )
        modules: list[tuple[float, float, str]] = []  # a device's program runs: start, end, name
        if device:
            lines = [ln for ln in device[0].lines if ln.name == "XLA Ops"]
            modules = [
                (ev.start_ns, ev.start_ns + ev.duration_ns, ev.name)
                for ln in device[0].lines
                if ln.name == "XLA Modules"
                for ev in ln.events
            ]
        else:
            lines = [ln for p in planes if p.name.startswith("/host:") for ln in p.lines]
        ops = []
        for line in lines:
            for ev in line.events:
                stats = dict(ev.stats)
                name = str(stats.get("hlo_op", "" if not device else ev.name))
                if not name:
                    continue
                module = str(stats.get("hlo_module", "")) or next(
                    (m for a, b, m in modules if a <= ev.start_ns < b), ""
                )
                ops.append(DeviceOp(module, name, ev.start_ns, ev.duration_ns))
        if ops:
            return ops
    return []


def _busy_ns(ops: Iterable[DeviceOp]) -> tuple[float, float]:
    """(span, union of the intervals) of `ops`, ns."""
    spans = sorted((o.start_ns, o.start_ns + o.duration_ns) for o in ops)
    if not spans:
        return 0.0, 0.0
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy += hi - lo
            lo, hi = a, b
        else:
            hi = max(hi, b)
    busy += hi - lo
    return max(b for _, b in spans) - spans[0][0], busy


def step_breakdown(
    ops: list[DeviceOp], modules: Mapping[str, str], model_flops: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Device time, matmul FLOPs and achieved TFLOP/s per part of one traced step.

    Args:
      ops: the traced step's device ops (`trace_ops`).
      modules: `{program name: compiled HLO text}` of the step's programs (the accumulate
        step's and `apply`'s); an op's module is matched by name (`jit_apply` -> "apply").
      model_flops: optional `{part: FLOPs}` by the model's own count (Pallas kernels' work,
        invisible in HLO), reported beside the HLO count.
    """
    parsed = {name: parse_hlo(text) for name, text in modules.items()}
    ms = dict.fromkeys(PARTS, 0.0)
    flops = dict.fromkeys(PARTS, 0.0)
    counted = []
    unknown = 0
    for o in ops:
        module = next((m for m in parsed if m in o.module), None)
        if module is None and not o.module:  # no module named: the first holding that op
            module = next((m for m, p in parsed.items() if o.name in p), None)
        if module is None and o.module:  # a small program of the step (zeros, a cast)
            hlo = HloOp("", "", 0.0)
        elif module is None or (hlo := parsed[module].get(o.name)) is None:
            unknown += 1
            continue
        if hlo.opcode in CONTAINERS:
            continue
        part = "other" if module is None else part_of(module, hlo)
        ms[part] += o.duration_ns / 1e6
        flops[part] += hlo.flops
        counted.append(o)
    span, busy = _busy_ns(counted)
    ms["idle"] = max(span - busy, 0.0) / 1e6
    parts = {}
    for p in PARTS:
        rec: dict[str, Any] = {
            "ms": ms[p],
            "hlo_tflops": flops[p] / 1e12,
            "tflops_per_s": (
                flops[p] / (ms[p] / 1e3) / 1e12 if ms[p] > 0 and flops[p] > 0 else None
            ),
        }
        if model_flops and p in model_flops:
            rec["model_tflops"] = model_flops[p] / 1e12
            rec["model_tflops_per_s"] = model_flops[p] / (ms[p] / 1e3) / 1e12 if ms[p] > 0 else None
        parts[p] = rec
    return {
        "span_ms": span / 1e6,
        "busy_ms": busy / 1e6,
        "ops": len(counted),
        "unmatched_ops": unknown,
        "parts": parts,
    }


def plot_breakdown(breakdown: Mapping[str, Any], path: Path, title: str = "") -> None:
    """A bar per part: its share of the step's span, labelled with ms and TFLOP/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = breakdown["parts"]
    span = max(breakdown["span_ms"], 1e-9)
    names = [p for p in PARTS if parts[p]["ms"] > 0]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    shares = [100 * parts[p]["ms"] / span for p in names]
    ax.barh(names[::-1], shares[::-1], color="tab:blue")
    for i, p in enumerate(names[::-1]):
        rate = parts[p].get("tflops_per_s") or parts[p].get("model_tflops_per_s")
        label = f"{parts[p]['ms']:.1f} ms" + ("" if rate is None else f", {rate:.0f} TFLOP/s")
        ax.text(shares[::-1][i], i, " " + label, va="center", fontsize=8)
    ax.set_xlabel("% of the step's span on the device")
    ax.set_xlim(0, max(shares) * 1.5 if shares else 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
