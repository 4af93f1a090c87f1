"""Native Sparse Attention on TPU: the three Pallas branches composed like the reference.

Reference: `pallas_kernels.reference.nsa_reference` (same signature, outputs and
gradients). Compression (mean pooling or the MLP) and the gate mix stay in XLA: they are
elementwise or small matmuls that XLA fuses well; every attention pass, forward and backward,
and the block-importance scores are Pallas kernels (`compressed`, `selected`, `window`).
Off-TPU the kernels run in the TPU interpreter (`_compat.tpu_interpret`).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.reference import NSAConfig, checks, combine_branches, compress_kv
from pallas_kernels.tiles import NSABlockSizes
from pallas_kernels.tpu.compressed import compressed_attention, select_blocks
from pallas_kernels.tpu.selected import selected_attention
from pallas_kernels.tpu.window import sliding_window_attention

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "block_sizes", "interpret"))
def nsa_attention(
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    compress_params: dict[str, Array] | None = None,
    block_sizes: NSABlockSizes | None = None,
    interpret: object = None,
) -> Array:
    """NSA: `o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`, `o: [B, T, Hq, D]`.

    Arguments as `reference.nsa_reference`, plus the kernels' tile sizes and `interpret`
    (default: compiled on a TPU, interpreted elsewhere). Differentiable in q, k, v, gates and
    `compress_params`; the block selection only picks indices.
    """
    b, t, hq, _, _ = checks.check_nsa_inputs(q, k, v, gates, segment_ids)
    bsz = block_sizes or NSABlockSizes()
    kw = dict(segment_ids=segment_ids, interpret=interpret)
    k_cmp, v_cmp = compress_kv(k, v, cfg, compress_params)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cfg, block_sizes=bsz.compressed, **kw)
    idx = select_blocks(q, k_cmp, lse, cfg, block_sizes=bsz.compressed, **kw)
    o_slc = selected_attention(q, k, v, idx, cfg, block_sizes=bsz.selected, **kw)
    o_swa = sliding_window_attention(q, k, v, cfg.window, block_sizes=bsz.window, **kw)
    return combine_branches(gates, o_cmp, o_slc, o_swa)
