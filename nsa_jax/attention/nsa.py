"""`nsa_attention`: one entry point, several backends (reference, Pallas TPU, Pallas GPU).

Every backend is a function with the signature of `pallas_kernels.reference.nsa_reference`.
Kernel packages are imported when first chosen (in `BACKENDS`' loaders), so that importing
`nsa_jax` never builds a kernel module it does not use; imports still run one way,
`nsa_jax -> pallas_kernels`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels.reference import NSAConfig, checks, nsa_reference

Array = jax.Array
NSAFunction = Callable[..., Array]


def _pallas_tpu() -> NSAFunction:
    from pallas_kernels import tpu

    return tpu.nsa_attention


def _pallas_gpu() -> NSAFunction:
    from pallas_kernels import gpu

    return gpu.nsa_attention


# implementation name -> loader of its NSA function; kernels register here when they land.
BACKENDS: dict[str, Callable[[], NSAFunction]] = {
    "reference": lambda: nsa_reference,
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
}
# what "auto" picks on each JAX backend
AUTO: dict[str, str] = {"cpu": "reference", "tpu": "pallas_tpu", "gpu": "pallas_gpu"}


def resolve_implementation(implementation: str) -> NSAFunction:
    """Returns the NSA function for `implementation` ("auto" picks by `jax.default_backend()`)."""
    name = (
        AUTO.get(jax.default_backend(), "reference") if implementation == "auto" else implementation
    )
    if name not in BACKENDS:
        raise ValueError(
            f"implementation must be 'auto' or one of {sorted(BACKENDS)}, got {implementation!r}"
        )
    try:
        return BACKENDS[name]()
    except ImportError as e:
        raise ValueError(
            f"implementation={name!r} is not available in this installation ({e}); "
            "use implementation='reference' or 'auto'"
        ) from e


def nsa_attention(
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    implementation: str = "auto",
    compress_params: dict[str, Array] | None = None,
) -> Array:
    """Native Sparse Attention over every earlier token: `[B, T, Hq, D]`.

    Args:
      q: `[B, T, Hq, D]` queries; `k`, `v`: `[B, T, Hkv, D]`, `Hq` a multiple of `Hkv`.
      gates: `[B, T, Hq, 3]` in (0, 1), last axis (compressed, selected, window).
      cfg: `NSAConfig`.
      segment_ids: optional `[B, T]` ints; packed samples do not attend across segments and
        padding (0) queries return zeros.
      implementation: "auto" (by backend), "reference", "pallas_tpu" (interpret mode off-TPU)
        or "pallas_gpu".
      compress_params: the compression MLP's params when `cfg.compression == "mlp"`.
    """
    checks.check_nsa_inputs(q, k, v, gates, segment_ids)
    fn = resolve_implementation(implementation)
    return fn(q, k, v, gates, cfg, segment_ids=segment_ids, compress_params=compress_params)
