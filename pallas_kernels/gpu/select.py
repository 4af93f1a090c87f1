"""Block importance for top-n selection: one Pallas (Triton) kernel plus `lax.top_k`.

`importance[b, h, t, c] = sum_{q-heads of KV head h} exp(q_t . k_cmp_c * scale - lse_t)` for the
compressed blocks `c` visible to `t` (0 elsewhere): the compressed-attention probabilities summed
over the GQA group, recomputed from the forward's `lse` (one extra QK^T pass, no `[T, Nc]` logits
kept per head). The mapping to selection blocks, the forced blocks (current, previous, first of
the segment) and the top-n follow `nsa_jax.attention.reference.select_blocks` exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nsa_jax.attention.reference import NSAConfig, _cmp_to_sel_weights, _segment_starts
from pallas_kernels._compat import TritonCompilerParams, pl
from pallas_kernels.gpu.banded import BandParams, _dot, _key_tiles, _visible

Array = jax.Array


def _importance_kernel(q_ref, kc_ref, segq_ref, bseg_ref, lse_ref, out_ref, *, p: BandParams,
                       g: int):
    it, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = p.block_q, p.block_k
    t0 = it * bq
    tpos = t0 + jnp.arange(bq)
    segq = segq_ref[b, pl.ds(t0, bq)]
    nkt = kc_ref.shape[1] // bk
    _, hi = _key_tiles(t0, bq, p, bk, nkt)

    def tile(j, carry):
        kc = kc_ref[b, pl.ds(j * bk, bk), h, :]
        vis = _visible(tpos, j * bk + jnp.arange(bk), segq, bseg_ref[b, pl.ds(j * bk, bk)], p)

        def head(i, acc):
            hq = h * g + i
            q = q_ref[b, pl.ds(t0, bq), hq, :]
            lse = lse_ref[b, hq, pl.ds(t0, bq)]
            s = _dot(q, kc, trans_b=True) * p.scale
            return acc + jnp.where(vis, jnp.exp(jnp.minimum(s - lse[:, None], 0.0)), 0.0)

        acc = lax.fori_loop(0, g, head, jnp.zeros((bq, bk), jnp.float32))
        out_ref[b, h, pl.ds(t0, bq), pl.ds(j * bk, bk)] = acc
        return carry

    def zero(j, carry):
        out_ref[b, h, pl.ds(t0, bq), pl.ds(j * bk, bk)] = jnp.zeros((bq, bk), jnp.float32)
        return carry

    lax.fori_loop(0, hi, tile, 0)
    lax.fori_loop(hi, nkt, zero, 0)


def block_importance(q: Array, k_cmp: Array, lse: Array, seg: Array, blk_seg: Array,
                     p: BandParams) -> Array:
    """`q: [B, T, Hq, D]`, `k_cmp: [B, Nc, Hkv, D]`, `lse: [B, Hq, T]` -> `[B, Hkv, T, Nc]` f32."""
    b, t, hq, _ = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    return pl.pallas_call(
        functools.partial(_importance_kernel, p=p, g=hq // hkv),
        grid=(t // p.block_q, hkv, b),
        out_shape=jax.ShapeDtypeStruct((b, hkv, t, nc), jnp.float32),
        compiler_params=TritonCompilerParams(num_warps=p.num_warps, num_stages=p.num_stages),
        interpret=p.interpret, name="nsa_block_importance",
    )(q, k_cmp, seg, blk_seg, lse)


def top_blocks(imp: Array, seg: Array, t_real: int, g: int, cfg: NSAConfig) -> Array:
    """`imp: [B, Hkv, T, Nc_pad]` importance -> `idx: [B, T, Hkv, n]` int32 (-1 = empty).

    Same rule as the reference: score per selection block, then the current, previous and
    first block of the segment forced (in that priority), candidates are blocks that start at or
    before the query inside its segment, top-n of the rest; `T` is the padded length.
    """
    b, hkv, t, _ = imp.shape
    nc, ns, n = cfg.num_cmp_blocks(t_real), cfg.num_sel_blocks(t), cfg.num_selected
    imp = imp[..., :nc]
    if cfg.block_size == cfg.cmp_block == cfg.cmp_stride:
        score = jnp.pad(imp, [(0, 0)] * 3 + [(0, ns - nc)])
    else:
        w = np.zeros((nc, ns), np.float32)
        w[:, : cfg.num_sel_blocks(t_real)] = _cmp_to_sel_weights(t_real, cfg)
        score = jnp.einsum("bhtc,cj->bhtj", imp, jnp.asarray(w))
    big = float(g) + 1.0
    cur = (jnp.arange(t) // cfg.block_size)[None, None, :, None]
    first = (_segment_starts(seg) // cfg.block_size)[:, None, :, None]
    j = jnp.arange(ns)[None, None, None, :]
    cand = (j <= cur) & (j >= first) & (seg[:, None, :, None] > 0)
    score = jnp.where(j == cur, big + 3.0, score)
    score = jnp.where((j == cur - 1) & cand, big + 2.0, score)
    score = jnp.where(j == first, big + 1.0, score)
    score = jnp.where(cand, score, -jnp.inf)
    top, idx = lax.top_k(score, min(n, ns))
    idx = jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)
    if n > ns:
        idx = jnp.pad(idx, [(0, 0)] * 3 + [(0, n - ns)], constant_values=-1)
    return jnp.moveaxis(idx, 1, 2)
