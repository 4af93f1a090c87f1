"""`AttentionConfig`: every attention setting of the language model, as one object.

The model config holds it (`ModelConfig.attention`); a decoder layer passes it whole to the
hybrid layer (`attention/hybrid.py`), which passes it whole to the NSA backend's loader
(`attention/nsa.py:resolve_implementation`): no setting is copied field by field on the way,
and each is reachable from a training override (`model.attention.gpu_blocks.slc_tokens=2`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pallas_kernels.reference import NSAConfig
from pallas_kernels.tiles import BlockSizes, NSABlockSizes

LseLayout = Literal["videonsa", "correct"]


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How the language model attends.

    Attributes:
      nsa: NSA settings, or None for plain Qwen2.5-VL (dense attention everywhere).
      layers: decoder layers that use hybrid NSA attention (None = all, when `nsa` is set).
      implementation: backend for NSA ("auto", "reference", "pallas_tpu", "pallas_gpu"); a
        runtime choice, not written to config.json nor read from it.
      lse_layout: under `nsa.videonsa_compat`, "videonsa" feeds the top-k the
        compressed-attention log-sum-exp read through VideoNSA's `[B, H, T]` -> `[B, T, H]`
        layout accident; "correct" feeds the true `[B, T, H]` one.
      tpu_blocks: tile sizes of the Pallas TPU kernels (`implementation="pallas_tpu"`).
      gpu_blocks: tile sizes of the Pallas GPU kernels (`implementation="pallas_gpu"`).
        Tile sizes are runtime choices like `implementation`: not in config.json.
    """

    nsa: NSAConfig | None = None
    layers: tuple[int, ...] | None = None
    implementation: str = "auto"
    lse_layout: LseLayout = "videonsa"
    tpu_blocks: NSABlockSizes = NSABlockSizes()
    gpu_blocks: BlockSizes = BlockSizes()

    def __post_init__(self) -> None:
        if self.lse_layout not in ("videonsa", "correct"):
            raise ValueError(
                f"attention.lse_layout must be 'videonsa' or 'correct', got {self.lse_layout!r}"
            )

    def uses_nsa(self, layer: int) -> bool:
        """Whether decoder layer `layer` is hybrid (NSA for video queries)."""
        return self.nsa is not None and (self.layers is None or layer in self.layers)

    def replace(self, **kw: object) -> AttentionConfig:
        return dataclasses.replace(self, **kw)
