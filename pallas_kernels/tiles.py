"""Kernel tile sizes of every backend: small frozen dataclasses in one light module.

A config holds them (`nsa_jax.attention.config.AttentionConfig`), so this module imports no
kernel package (the TPU one takes seconds to import): only the reference's argument checks.
The kernels take their tile sizes from here; `pallas_kernels.tpu` and `pallas_kernels.gpu`
re-export them.

TPU (Mosaic): `NSABlockSizes` holds one dataclass per branch (`CompressedBlockSizes`,
`SelectedBlockSizes`, `WindowBlockSizes`). GPU (Triton): `BlockSizes`.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.reference import checks

SUBLANES = 16  # bf16 sublane packing; a multiple of f32's 8
# int32 list entries one kernel call may scalar-prefetch: 64 KiB of SMEM (1 MiB on v5e, where the
# compiler keeps its own scalars too); every list longer than this is walked in chunks
LIST_BUDGET = 16384


def check_list_budget(list_budget: int) -> None:
    """A kernel call needs room for at least one query tile's list (or one pair) per batch row
    and KV head; 64 entries is the floor the block-size dataclasses accept."""
    if not isinstance(list_budget, int) or list_budget < 64:
        raise ValueError(f"list_budget must be an integer >= 64, got {list_budget!r}")


def check_tile(**sizes: int) -> None:
    """Key tiles sit on the sublane axis of K/V and the lane axis of the logits: a multiple of
    16 keeps bf16 tiles whole (the wrapper pads selection blocks, which the user picks)."""
    checks.check_positive(**sizes)
    for name, value in sizes.items():
        if value % SUBLANES:
            raise ValueError(
                f"{name} must be a multiple of {SUBLANES} (TPU sublane tile), got {value}"
            )


@dataclasses.dataclass(frozen=True)
class CompressedBlockSizes:
    """Tiles of the compressed-attention and block-importance kernels.

    block_q: query tokens per tile (`block_q * G` rows; the compressed branch has many queries
      and few keys, so large query tiles amortise each key fetch).
    block_kv: compressed keys per tile, a multiple of 16 (sublanes).
    select_chunk: query tiles per top-n chunk in XLA (the live score array is
      `select_chunk * block_q * B * Hkv * Nsel` f32).
    select_bytes: cap on that array: long sequences (large `Nsel`) take fewer tiles per chunk,
      down to one, so the scores in HBM stay under this size rather than growing with T.
    list_budget: block-list entries one kernel call holds in SMEM (scalar prefetch); longer
      lists are walked in chunks of calls, so SMEM use does not grow with T.
    """

    block_q: int = 128
    block_kv: int = 128
    select_chunk: int = 32
    select_bytes: int = 256 * 2**20
    list_budget: int = LIST_BUDGET

    def __post_init__(self) -> None:
        checks.check_positive(
            block_q=self.block_q, select_chunk=self.select_chunk, select_bytes=self.select_bytes
        )
        check_tile(block_kv=self.block_kv)
        check_list_budget(self.list_budget)


# A tile visits the union of its tokens' selections, up to `block_q * n` blocks when no two
# tokens agree: past half a 64-token selection block of tokens (small groups: GQA 1 would
# want 128 tokens) more rows stop paying for the extra masked blocks they visit.
MAX_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class SelectedBlockSizes:
    """Tiles of the selected-attention kernels.

    block_q: query tokens per tile (the tile has `block_q * G` rows); None (default): the
      most tokens whose rows fit `rows`, at most `MAX_TOKENS` (`tokens`). The key tile is
      the selection block `l'` itself, padded to a multiple of 16 sublanes inside the wrapper.
    rows: the row count the default tile fills: 128 matches the 128 x 128 MXU of v5e and v5p
      and one 128-lane tile of side data (256 would match v6e's 256 x 256 MXU, at twice the
      masked work per visited block).
    list_budget: block-list entries one kernel call holds in SMEM (scalar prefetch); longer
      lists are walked in chunks of calls, so SMEM use does not grow with T.
    """

    block_q: int | None = None
    rows: int = 128
    list_budget: int = LIST_BUDGET

    def __post_init__(self) -> None:
        checks.check_positive(rows=self.rows)
        if self.block_q is not None:
            checks.check_positive(block_q=self.block_q)
        check_list_budget(self.list_budget)

    def tokens(self, g: int) -> int:
        """Query tokens per tile for a GQA group of `g` heads."""
        return self.block_q or max(1, min(MAX_TOKENS, self.rows // g))


@dataclasses.dataclass(frozen=True)
class WindowBlockSizes:
    """Tiles of the sliding-window kernels.

    block_q: query tokens per tile (the tile has `block_q * G` rows, one K/V fetch per group).
    block_kv: keys per tile, a multiple of 16 (sublanes); 128 fills the MXU's lane axis.
    A window smaller than `block_kv` still works; it just masks more of each tile.
    list_budget: block-list entries one kernel call holds in SMEM (scalar prefetch); longer
      lists are walked in chunks of calls, so SMEM use does not grow with T.
    """

    block_q: int = 128
    block_kv: int = 128
    list_budget: int = LIST_BUDGET

    def __post_init__(self) -> None:
        checks.check_positive(block_q=self.block_q)
        check_tile(block_kv=self.block_kv)
        check_list_budget(self.list_budget)


@dataclasses.dataclass(frozen=True)
class NSABlockSizes:
    """Tile sizes of every branch's kernels (each checked by its own dataclass)."""

    compressed: CompressedBlockSizes = CompressedBlockSizes()
    selected: SelectedBlockSizes = SelectedBlockSizes()
    window: WindowBlockSizes = WindowBlockSizes()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the GPU kernels (tokens unless said otherwise).

    Attributes:
      cmp_q, cmp_k: query / compressed-key tiles of the compressed forward and dQ.
      cmp_q_bwd, cmp_k_bwd: tiles of the compressed dK/dV kernel.
      cmp_splits: query-range splits of the compressed dK/dV kernel (0 = pick for ~32 waves).
      win_q, win_k, win_q_bwd, win_k_bwd: tiles of the sliding-window kernels.
      score_q, score_k: query tokens / selection blocks per tile of the selection kernel
        (`score_k = 0`: 128 for GQA groups of 16 or more, whose query tile is reloaded per
        block tile and head, else 64; 128K on H100, tile 128 vs 64: 13.0 vs 15.0 ms for 64/4
        heads, 10.3 vs 9.9 ms for 28/4).
      slc_rows: gathered query rows per step of the selected dK/dV kernel (>= G).
      slc_item_chunks: steps per selected dK/dV program.
      slc_tokens: query tokens per selected forward / dQ program (1: one token's group per
        program; more: token tiles over the union of their blocks, for small GQA groups).
      slc_dq_in_dkv: selected dQ from the block-centric dK/dV kernel by f32 atomic adds (each
        K/V block read once for dK, dV and dQ) instead of the group-centric dQ kernel. Off:
        the element-wise atomics cost more than the second gather saves (128K, 64/4 heads:
        431 vs 207 ms forward+backward; docs/benchmarks.md).
      slc_group_warps: num_warps of the selected forward and dQ kernels (0 = num_warps); two
        warps suit a `[16, D]` group tile (128K, H200: 7-9% faster than four).
      num_warps, num_stages: Triton launch parameters shared by every kernel.
    """

    cmp_q: int = 64
    cmp_k: int = 64
    cmp_q_bwd: int = 64
    cmp_k_bwd: int = 64
    cmp_splits: int = 0
    win_q: int = 64
    win_k: int = 64
    win_q_bwd: int = 64
    win_k_bwd: int = 64
    score_q: int = 64
    score_k: int = 0
    slc_rows: int = 64
    slc_item_chunks: int = 64
    slc_tokens: int = 1
    slc_dq_in_dkv: bool = False
    slc_group_warps: int = 2
    num_warps: int = 4
    num_stages: int = 2
