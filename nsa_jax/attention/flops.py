"""Matmul FLOP counts of NSA and dense attention, for benchmarks and model FLOPs utilisation."""

from __future__ import annotations

import numpy as np

from pallas_kernels.reference import NSAConfig


def nsa_branch_keys(
    positions: np.ndarray, cfg: NSAConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys a query at each of `positions` (0-based, within its sample) attends to in the
    compressed, selected and window branches: three int64 arrays shaped like `positions`.
    Selection counts `n` whole blocks, as if all were full and earlier than the query (an
    upper bound within one block)."""
    t = np.asarray(positions, np.int64)
    # compressed block c is visible once its last token, c * d + l - 1, is at or before t
    cmp = np.clip((t - cfg.cmp_block + 1) // cfg.cmp_stride + 1, 0, None)
    slc = np.minimum(cfg.num_selected * cfg.block_size, t + 1)
    swa = np.minimum(t + 1, cfg.window) if cfg.window else np.zeros_like(t)
    return cmp, slc, swa


def flops_nsa(t: int, hq: int, d: int, cfg: NSAConfig) -> dict[str, float]:
    """Forward matmul FLOPs NSA needs per batch row of `t` tokens (the keys of
    `nsa_branch_keys` at every position)."""
    cmp_keys, slc_keys, swa_keys = (int(k.sum()) for k in nsa_branch_keys(np.arange(t), cfg))
    per_key = 4 * hq * d  # QK^T and PV, 2 FLOPs per multiply-add
    return {
        "compressed": per_key * cmp_keys,
        "selected": per_key * slc_keys,
        "window": per_key * swa_keys,
        "total": per_key * (cmp_keys + slc_keys + swa_keys),
    }


def flops_dense(t: int, hq: int, d: int) -> float:
    """Forward matmul FLOPs of causal dense attention, per batch row."""
    return 4 * hq * d * t * (t + 1) / 2
