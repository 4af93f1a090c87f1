"""`nsa_attention`: one entry point, several backends (reference, Pallas TPU, Pallas GPU).

Every backend is a function with the signature of `pallas_kernels.reference.nsa_reference`.
Its loader in `BACKENDS` takes the layer's `AttentionConfig` whole and binds the kernels' tile
sizes from it. Kernel packages are imported when first chosen (in the loaders), so that
importing `nsa_jax` never builds a kernel module it does not use; imports still run one way,
`nsa_jax -> pallas_kernels`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from nsa_jax.attention.config import AttentionConfig
from nsa_jax.attention.partition import per_shard
from pallas_kernels.reference import NSAConfig, nsa_reference

Array = jax.Array
NSAFunction = Callable[..., Array]


# Pallas kernels are not partitioned by XLA: under a mesh they run per shard (`partition`)
def _pallas_tpu(attn: AttentionConfig) -> NSAFunction:
    from pallas_kernels import tpu

    return per_shard(functools.partial(tpu.nsa_attention, block_sizes=attn.tpu_blocks))


def _pallas_gpu(attn: AttentionConfig) -> NSAFunction:
    from pallas_kernels import gpu

    return per_shard(functools.partial(gpu.nsa_attention, block_sizes=attn.gpu_blocks))


# implementation name -> loader of its NSA function (given the attention settings, for the
# kernels' tile sizes); kernels register here when they land.
BACKENDS: dict[str, Callable[[AttentionConfig], NSAFunction]] = {
    "reference": lambda attn: nsa_reference,
    "pallas_tpu": _pallas_tpu,
    "pallas_gpu": _pallas_gpu,
}
# what "auto" picks on each JAX backend
AUTO: dict[str, str] = {"cpu": "reference", "tpu": "pallas_tpu", "gpu": "pallas_gpu"}


def resolve_implementation(attn: AttentionConfig) -> NSAFunction:
    """The NSA function of `attn.implementation` ("auto" picks by `jax.default_backend()`),
    with the kernel tile sizes of `attn`."""
    implementation = attn.implementation
    name = (
        AUTO.get(jax.default_backend(), "reference") if implementation == "auto" else implementation
    )
    if name not in BACKENDS:
        raise ValueError(
            f"implementation must be 'auto' or one of {sorted(BACKENDS)}, got {implementation!r}"
        )
    try:
        return BACKENDS[name](attn)
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
        or "pallas_gpu", at the kernels' default tiles (other tiles: `resolve_implementation`
        of an `AttentionConfig`).
      compress_params: the compression MLP's params when `cfg.compression == "mlp"`.
    """
    # every backend checks its inputs (`checks.check_nsa_inputs`), once per call
    fn = resolve_implementation(AttentionConfig(nsa=cfg, implementation=implementation))
    return fn(q, k, v, gates, cfg, segment_ids=segment_ids, compress_params=compress_params)
