"""Matmul FLOP counts of NSA and dense attention, for benchmarks and model FLOPs utilisation."""

from __future__ import annotations

from pallas_kernels.reference import NSAConfig


def flops_nsa(t: int, hq: int, d: int, cfg: NSAConfig) -> dict[str, float]:
    """Forward matmul FLOPs NSA needs per batch row (causal keys only; selection as if all
    `n` blocks were full and earlier than the query, an upper bound within one block)."""
    nc = cfg.num_cmp_blocks(t)
    cmp_keys = sum(max(0, min(nc, (tt - cfg.cmp_block) // cfg.cmp_stride + 1)) for tt in range(t))
    slc_keys = sum(min(cfg.num_selected * cfg.block_size, tt + 1) for tt in range(t))
    swa_keys = sum(min(tt + 1, cfg.window) for tt in range(t)) if cfg.window else 0
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
