"""Selected-block attention on TPU: Pallas kernels (forward, dq, dk/dv) with a custom_vjp.

Reference: `pallas_kernels.reference.selected_attention` (same signature and outputs).

Query tile = `block_q` tokens x the whole GQA group (`block_q * G` rows), so one K/V block
fetch serves every head of the group. By default the tile stacks as many tokens as fit 128
rows (18 tokens for a group of 7: 126 rows, where 8 tokens gave 56): the MXU latches the
`[D, l']` key block once per step and streams the rows through it, so a step of few rows pays
the weight load for little work, and each K/V fetch from HBM serves more rows. Not past 128:
the per-row side data travels with rows along lanes (`block_sparse.pack_rows`), so 133 rows
would pad to 256 lanes. A tile visits the
union of the blocks its tokens selected: in XLA the tile's `block_q * n` indices are sorted
and deduplicated into at most `U = min(Nsel, block_q * n)` ascending blocks, which reach the
kernel by scalar prefetch and drive the K/V index maps; `-1` slots sit at the tail, repeat the
last block index (no new DMA) and skip compute. A row's mask keeps only the blocks its own
token selected (`idx_rows`), causally, within its segment. `block_q = 1` is the NSA paper's
one-token-per-step kernel; a larger tile trades extra masked FLOPs for fewer, larger steps
(see `docs/tpu_roofline.md`).

Backward without atomics: dq revisits the forward lists; dk/dv run over the forward's
(block, query tile) pairs sorted by block (a reverse index built from `idx` in XLA), each
block accumulating in VMEM over its consecutive pairs and written once (`block_sparse`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.numerics import cdiv
from pallas_kernels.reference import NSAConfig, checks
from pallas_kernels.reference.segments import as_segments
from pallas_kernels.tiles import SelectedBlockSizes
from pallas_kernels.tpu import block_sparse as bs
from pallas_kernels.tpu.tokens import Side, attend_tokens

Array = jax.Array
def tile_lists(idx: Array, block_q: int, num_u: int) -> bs.FwdLists:
    """Union of the blocks selected by each tile's tokens: `idx [B, T, Hkv, n]` -> lists."""
    b, t, hkv, n = idx.shape
    nq = cdiv(t, block_q)
    idx = jnp.pad(idx, [(0, 0), (0, nq * block_q - t), (0, 0), (0, 0)], constant_values=-1)
    raw = idx.reshape(b, nq, block_q, hkv, n).transpose(0, 3, 1, 2, 4)
    return bs.fwd_lists(raw.reshape(b, hkv, nq, block_q * n), num_u)


@functools.partial(jax.jit, static_argnames=("cfg", "block_sizes", "interpret"))
def selected_attention(
    q: Array,
    k: Array,
    v: Array,
    idx: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    block_sizes: SelectedBlockSizes | None = None,
    interpret: object = None,
) -> Array:
    """Attention over the tokens of the selected blocks: `o: [B, T, Hq, D]` in q.dtype.

    `idx: [B, T, Hkv, n]` int32 block indices (distinct per row, -1 = empty slot).
    Differentiable in q, k, v.
    """
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    n = idx.shape[-1]
    checks.check_trailing("idx", idx, (b, t, hkv, n))
    checks.check_segment_ids(segment_ids, b, t)
    bsz = block_sizes or SelectedBlockSizes()
    bq = bsz.tokens(hq // hkv)
    idx = idx.astype(jnp.int32)
    tokens = Side(as_segments(segment_ids, b, t), jnp.arange(t, dtype=jnp.int32))
    o, _ = attend_tokens(
        q, k, v,
        queries=tokens,
        keys=tokens,
        block_q=bq,
        block_kv=cfg.block_size,  # padded to the sublane tile inside
        lists=tile_lists(idx, bq, min(cfg.num_sel_blocks(t), bq * n)),
        spec=bs.MaskSpec(use_member=True),
        idx=idx,
        interpret=interpret,
        list_budget=bsz.list_budget,
    )  # fmt: skip
    return o
