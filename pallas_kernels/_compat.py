"""Version-dependent Pallas imports, in one place (shared by the TPU and GPU kernels).

One section per backend, each exporting only the names its kernels need. Only public `jax`
modules are imported here at import time; a private `jax._src` module is imported inside the
function that needs it, so a jax release that moves it breaks that function, not the package.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

__all__ = ["pl"]

# --- GPU (Triton lowering) -----------------------------------------------------------------

try:  # jax >= 0.6: `CompilerParams`; older releases called it `TritonCompilerParams`
    TritonCompilerParams = pltriton.CompilerParams
except AttributeError:  # pragma: no cover - old jax
    TritonCompilerParams = pl.TritonCompilerParams  # type: ignore[attr-defined]

__all__ += ["pltriton", "TritonCompilerParams"]

# --- TPU (Mosaic lowering; interpret mode off-TPU) -----------------------------------------

TPUInterpretParams = pltpu.InterpretParams  # jax >= 0.7; earlier: pltpu.TPUInterpretParams


_AOT = threading.local()


@contextlib.contextmanager
def compiling_for_tpu() -> Iterator[None]:
    """Within it, TPU kernels called with `interpret=None` are traced compiled (Mosaic), as on a
    TPU, although JAX's default backend is the CPU: for programs lowered onto a described TPU
    slice (`jax.experimental.topologies`) and compiled ahead of time by libtpu.

    JAX caches the traces of inner `jax.jit` functions by their arguments, not by this switch,
    so the caches are cleared on entry and on exit: a trace made for the interpreter is never
    reused for the compiler, nor the other way round.
    """
    jax.clear_caches()
    before = getattr(_AOT, "on", False)
    _AOT.on = True
    try:
        yield
    finally:
        _AOT.on = before
        jax.clear_caches()


def tpu_interpret(interpret: object = None) -> object:
    """`interpret=` for a TPU `pallas_call`: the caller's choice, else compiled on a TPU (or
    inside `compiling_for_tpu`) and the TPU interpreter (which simulates VMEM/SMEM, DMAs and
    semaphores) anywhere else."""
    if interpret is not None:
        return interpret
    if getattr(_AOT, "on", False) or jax.default_backend() == "tpu":
        return False
    return TPUInterpretParams()


def tpu_races_found() -> bool:
    """Whether the last interpreted kernel run with `detect_races=True` found a data race.

    jax 0.10 keeps the detector's state in a private module global (`races.races_found`),
    reset at the start of each interpreted call.
    """
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    races = getattr(interpret_pallas_call, "races", None)
    return bool(races is not None and races.races_found)


__all__ += [
    "pltpu", "TPUInterpretParams", "compiling_for_tpu", "tpu_interpret", "tpu_races_found",
]
