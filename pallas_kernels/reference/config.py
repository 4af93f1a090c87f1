"""`NSAConfig`: the NSA hyper-parameters every backend takes (VideoNSA's defaults)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from pallas_kernels.numerics import cdiv
from pallas_kernels.reference import checks

Compression = Literal["mean", "mlp"]
FlaTopk = Literal["0.3.1", "0.3.0"]


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """NSA hyper-parameters. Defaults are VideoNSA's released training setting.

    Attributes:
      block_size: selection block length `l'` (tokens).
      compress_block: compression block length `l`; defaults to `block_size`.
      compress_stride: compression stride `d`; defaults to `block_size`. `d < l` gives
        overlapping compression blocks.
      num_selected: number of selected blocks `n` per query and KV head (the first block, the
        current and the previous block included).
      window: sliding-window length `w` (the query and `w - 1` tokens before it); 0 disables
        the window branch.
      compression: "mean" pooling or the NSA paper's learnable "mlp" with intra-block
        position encoding.
      gate_temperature: gate logits are divided by this before the sigmoid (used by the
        gate MLP in the model, stored here so one config describes the layer).
      videonsa_compat: reproduce the released VideoNSA arithmetic (see `docs/nsa.md`):
        a query sees compressed blocks `c` with `t <= c*d + l - 1` (its own and later blocks),
        and the selection is fla's `parallel_nsa_topk` (`videonsa_topk`, which needs
        `compress_block == compress_stride == block_size`, as fla's top-k does).
      fla_topk: which fla release's top-k rule compat follows: "0.3.0" (default: the fla that
        VideoNSA's released code vendors, `ms-swift/fla` and `lmms-eval/fla`, forces only the
        current block) or "0.3.1" (the first, previous and current blocks; `docs/nsa.md`).
      query_chunk: queries per `lax.map` step in this reference (memory knob only).
    """

    block_size: int = 64
    compress_block: int | None = None
    compress_stride: int | None = None
    num_selected: int = 32
    window: int = 256
    compression: Compression = "mean"
    gate_temperature: float = 0.3
    videonsa_compat: bool = False
    fla_topk: FlaTopk = "0.3.0"
    query_chunk: int = 128

    def __post_init__(self) -> None:
        checks.check_positive(
            block_size=self.block_size,
            compress_block=self.compress_block,
            compress_stride=self.compress_stride,
            num_selected=self.num_selected,
            query_chunk=self.query_chunk,
        )
        if not isinstance(self.window, (int, np.integer)) or self.window < 0:
            raise ValueError(
                f"window must be a non-negative integer (0 = off), got {self.window!r}"
            )
        if self.fla_topk not in ("0.3.1", "0.3.0"):
            raise ValueError(f"fla_topk must be '0.3.0' or '0.3.1', got {self.fla_topk!r}")
        if self.compression not in ("mean", "mlp"):
            raise ValueError(f"compression must be 'mean' or 'mlp', got {self.compression!r}")
        if not self.gate_temperature > 0:
            raise ValueError(f"gate_temperature must be > 0, got {self.gate_temperature!r}")
        if self.cmp_block % self.cmp_stride:
            raise ValueError(
                f"compress block ({self.cmp_block}) must be a multiple of the compression "
                f"stride ({self.cmp_stride})"
            )
        if self.block_size % self.cmp_stride:
            raise ValueError(
                f"select block must be a multiple of the compression stride: block_size "
                f"{self.block_size} vs compress_stride {self.cmp_stride}"
            )

    @property
    def cmp_block(self) -> int:
        return self.compress_block or self.block_size

    @property
    def cmp_stride(self) -> int:
        return self.compress_stride or self.block_size

    def num_cmp_blocks(self, t: int) -> int:
        """Compressed blocks for `t` tokens: one per stride start inside the sequence."""
        return cdiv(t, self.cmp_stride)

    def num_sel_blocks(self, t: int) -> int:
        return cdiv(t, self.block_size)
