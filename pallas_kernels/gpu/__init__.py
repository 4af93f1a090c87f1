"""Pallas GPU kernels (Triton lowering) for Native Sparse Attention on H100-class GPUs.

`nsa_attention` has the signature of `pallas_kernels.reference.nsa_reference`. Importing this
package needs no GPU: every kernel runs in Pallas interpret mode on a CPU.
"""

from pallas_kernels.gpu.banded import BandParams, banded_attention, banded_rows
from pallas_kernels.gpu.nsa import nsa_attention, nsa_indices
from pallas_kernels.gpu.selected import (
    SelParams,
    invert_indices,
    selected_attention,
    selected_mixed,
)
from pallas_kernels.tiles import BlockSizes

__all__ = [
    "BandParams",
    "BlockSizes",
    "SelParams",
    "banded_attention",
    "banded_rows",
    "invert_indices",
    "nsa_attention",
    "nsa_indices",
    "selected_attention",
    "selected_mixed",
]
