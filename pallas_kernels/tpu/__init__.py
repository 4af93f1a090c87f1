"""Pallas TPU (Mosaic) kernels for Native Sparse Attention, forward and backward.

Every public function has the signature of its `pallas_kernels.reference` counterpart (plus
tile sizes and `interpret`); off-TPU the kernels run in the TPU interpreter, so they can be
checked on any machine. The kernels are one block-sparse family (`block_sparse`), their tile
sizes in `pallas_kernels.tiles`; `dense_attention` is JAX's splash attention with segments and
GQA (`dense`), and `aot` compiles any of them for TPU chips on a CPU host.
`TPUInterpretParams` and `tpu_races_found` are the interpreter's settings and its race
detector's verdict, for tests that run a kernel with `detect_races=True`.
"""

from pallas_kernels._compat import TPUInterpretParams, tpu_races_found
from pallas_kernels.tiles import (
    CompressedBlockSizes,
    NSABlockSizes,
    SelectedBlockSizes,
    WindowBlockSizes,
)
from pallas_kernels.tpu.compressed import compressed_attention, select_blocks
from pallas_kernels.tpu.dense import DenseBlockSizes, dense_attention
from pallas_kernels.tpu.nsa import nsa_attention
from pallas_kernels.tpu.selected import selected_attention
from pallas_kernels.tpu.window import sliding_window_attention

__all__ = [
    "CompressedBlockSizes",
    "DenseBlockSizes",
    "NSABlockSizes",
    "SelectedBlockSizes",
    "TPUInterpretParams",
    "WindowBlockSizes",
    "compressed_attention",
    "dense_attention",
    "nsa_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "tpu_races_found",
]
