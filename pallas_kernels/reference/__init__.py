"""The NSA specification in pure `jax.numpy`: what every kernel in `pallas_kernels` computes.

Kernels sit beside it and are tested against it (as JAX's own Pallas ops keep a reference next
to each kernel). Modules: `config` (NSAConfig), `checks` (input validation), `segments`
(segments and visibility), `chunks` (query-chunk machinery), `nsa` (the branches, the selection
rule and their gate mix), `videonsa` (VideoNSA's top-k).
"""

from pallas_kernels.reference.config import NSAConfig
from pallas_kernels.reference.nsa import (
    cmp_to_sel_weights,
    combine_branches,
    compress_kv,
    compressed_attention,
    forced_scores,
    init_compress_params,
    nsa_reference,
    select_blocks,
    selected_attention,
    sliding_window_attention,
    top_n_slots,
)
from pallas_kernels.reference.videonsa import videonsa_topk

__all__ = [
    "NSAConfig",
    "cmp_to_sel_weights",
    "combine_branches",
    "compress_kv",
    "compressed_attention",
    "forced_scores",
    "init_compress_params",
    "nsa_reference",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "top_n_slots",
    "videonsa_topk",
]
