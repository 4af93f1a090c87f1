"""Native Sparse Attention in pure `jax.numpy`: the executable specification.

Every kernel backend (`pallas_kernels.tpu`, `pallas_kernels.gpu`) is checked against these
functions, which is why they live here, beside the kernels. Shapes: `q: [B, T, Hq, D]`,
`k, v: [B, T, Hkv, D]` with `Hq = G * Hkv` (any group size G), `gates: [B, T, Hq, 3]`
(compressed, selected, window), block indices `[B, T, Hkv, n]` int32 with -1 for empty slots,
`segment_ids: [B, T]` (0 = padding).

Notation (the NSA paper's): compression block length `l = cfg.cmp_block`, stride
`d = cfg.cmp_stride`, selection block `l' = cfg.block_size`, `n = cfg.num_selected`, window `w`.
Compressed block `c` covers tokens `[c*d, c*d + l)`; selection block `j` covers
`[j*l', (j+1)*l')`. The maths is written out in `docs/nsa.md`.

Precision: inputs may be bf16 or f32; logits, softmax and accumulation are f32; outputs are
cast back to `q.dtype`.

Memory: every branch maps over query chunks (`lax.map`, `chunks.py`), so no `[T, T]` matrix
is ever built; the backward pass recomputes each chunk instead of keeping its intermediates, so
loss-and-gradient memory is linear in T as well (no `[T, Nc]` probabilities kept).
Peak working set per chunk of `C` queries (f32):
- compressed: `B*C*Hq*(T/d)` logits;
- selected: gathered keys and values `2*B*C*Hkv*n*l'*D` plus `B*C*Hq*n*l'` logits;
- window: `B*C*Hq*(C + w - 1)` logits plus the `(C + w - 1)`-token K/V slice.
`C` is chosen so the selected branch's gather stays under `chunks.CHUNK_BUDGET_BYTES` (128 MiB):
for T = 8192, Hq = 28, Hkv = 4, D = 128, n = 32, l' = 64 that is C = 16 and ~136 MiB peak
for the selected branch; the whole forward stays well under 1 GiB besides inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.numerics import round_up
from pallas_kernels.reference import checks
from pallas_kernels.reference.chunks import (
    cmp_logits,
    group_heads,
    map_query_chunks,
    masked_softmax,
    pad_time,
    query_chunk_size,
    softmax_scale,
    time_slice,
)
from pallas_kernels.reference.config import NSAConfig
from pallas_kernels.reference.segments import (
    as_segments,
    cmp_block_segments,
    cmp_visible,
    segment_starts,
)
from pallas_kernels.reference.videonsa import videonsa_topk

Array = jax.Array


# --------------------------------------------------------------------------- compression


def init_compress_params(
    key: Array, cfg: NSAConfig, head_dim: int, dtype: jnp.dtype = jnp.float32
) -> dict[str, Array]:
    """Parameters of the learnable compression MLP `phi` (NSA paper, Sec. 3.3.1).

    `phi(block) = W2 @ gelu(W1 @ flatten(block + pos) + b1) + b2`, one MLP for keys and one
    for values, shared across KV heads; `pos: [l, D]` is the intra-block position encoding.
    W2 starts so that `phi` is close to mean pooling, which keeps early training stable.
    """
    l = cfg.cmp_block
    hidden = head_dim
    ks = jax.random.split(key, 4)
    params: dict[str, Array] = {}
    for i, name in enumerate(("k", "v")):
        k1, k2 = jax.random.split(ks[i])
        params[f"{name}_pos"] = 0.02 * jax.random.normal(ks[2 + i], (l, head_dim), dtype)
        params[f"{name}_w1"] = (
            jax.random.normal(k1, (l * head_dim, hidden), dtype) * (l * head_dim) ** -0.5
        )
        params[f"{name}_b1"] = jnp.zeros((hidden,), dtype)
        params[f"{name}_w2"] = jax.random.normal(k2, (hidden, head_dim), dtype) * hidden**-0.5
        params[f"{name}_b2"] = jnp.zeros((head_dim,), dtype)
    return params


def _compress_one(x: Array, cfg: NSAConfig, params: dict[str, Array] | None, name: str) -> Array:
    """`x: [B, T, Hkv, D]` -> `[B, Nc, Hkv, D]`, block c over tokens `[c*d, c*d + l)`."""
    b, t, h, d = x.shape
    nc, l, s = cfg.num_cmp_blocks(t), cfg.cmp_block, cfg.cmp_stride
    tok = np.arange(nc)[:, None] * s + np.arange(l)[None]  # [Nc, l], static
    present = jnp.asarray(tok < t)
    xf = x.astype(jnp.float32)
    blocks = pad_time(xf, int(tok.max()) + 1)[:, tok]  # [B, Nc, l, Hkv, D]
    blocks = jnp.where(present[None, :, :, None, None], blocks, 0.0)
    if cfg.compression == "mean":
        count = present.sum(-1).astype(jnp.float32)  # a trailing partial block: tokens present
        return blocks.sum(2) / count[None, :, None, None]
    assert params is not None
    pos = params[f"{name}_pos"].astype(jnp.float32)  # [l, D]
    blocks = jnp.where(present[None, :, :, None, None], blocks + pos[None, None, :, None], 0.0)
    flat = jnp.moveaxis(blocks, 2, 3).reshape(b, nc, h, l * d)
    hidden = jax.nn.gelu(flat @ params[f"{name}_w1"].astype(jnp.float32) + params[f"{name}_b1"])
    return hidden @ params[f"{name}_w2"].astype(jnp.float32) + params[f"{name}_b2"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def compress_kv(
    k: Array, v: Array, cfg: NSAConfig, params: dict[str, Array] | None = None
) -> tuple[Array, Array]:
    """Compresses keys and values into blocks: `[B, T, Hkv, D]` -> `[B, Nc, Hkv, D]`.

    `Nc = ceil(T / d)`; block `c` covers `[c*d, c*d + l)`. Mean pooling averages the tokens
    present (a trailing partial block averages fewer); "mlp" applies `phi` from
    `init_compress_params` to each block plus its intra-block position encoding. Outputs are f32.
    """
    checks.check_qkv(k, k, v)
    if cfg.compression == "mlp":
        if params is None:
            raise ValueError(
                "compression='mlp' needs params: pass params=init_compress_params(key, cfg, D)"
            )
        d = k.shape[-1]
        expected = jax.eval_shape(lambda: init_compress_params(jax.random.key(0), cfg, d))
        for name, ref in expected.items():
            if name not in params:
                raise ValueError(f"compression params are missing {name!r}")
            checks.check_trailing(f"params[{name!r}]", params[name], ref.shape)
    return _compress_one(k, cfg, params, "k"), _compress_one(v, cfg, params, "v")


# --------------------------------------------------------------------------- compressed branch


@functools.partial(jax.jit, static_argnames=("cfg",))
def compressed_attention(
    q: Array,
    k_cmp: Array,
    v_cmp: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
) -> tuple[Array, Array]:
    """Attention over compressed blocks. Returns `o: [B, T, Hq, D]` and `lse: [B, T, Hq]` f32.

    Query `t` sees block `c` only when the block has ended, `c*d + l - 1 <= t`, and all of its
    tokens are in the query's segment. Queries that see no block get `o = 0`, `lse = -inf`.
    """
    b, t, hq, d = q.shape
    hkv = k_cmp.shape[2]
    checks.check_qkv(q, q[:, :, :hkv], q[:, :, :hkv])
    nc = cfg.num_cmp_blocks(t)
    checks.check_trailing("k_cmp", k_cmp, (b, nc, hkv, d))
    checks.check_trailing("v_cmp", v_cmp, (b, nc, hkv, d))
    seg = as_segments(segment_ids, b, t)
    blk_seg = cmp_block_segments(seg, cfg)
    c = query_chunk_size(t, cfg, 4 * hq * nc * 4)
    tp = round_up(t, c)
    qp, segp = pad_time(q, tp), pad_time(seg, tp)

    def chunk(start: Array) -> tuple[Array, Array]:
        s = cmp_logits(qp, k_cmp, start, c, hkv)
        t_pos = start + jnp.arange(c)
        vis = cmp_visible(t_pos, time_slice(segp, start, c), blk_seg, cfg)
        p, lse = masked_softmax(s, vis[:, :, None, None, :])
        o = jnp.einsum("bcgkn,bngd->bcgkd", p, v_cmp.astype(jnp.float32))
        return o.reshape(b, c, hq, d), lse.reshape(b, c, hq)

    o, lse = map_query_chunks(chunk, t, c)
    return o.astype(q.dtype), lse


# --------------------------------------------------------------------------- selection


def cmp_to_sel_weights(t: int, cfg: NSAConfig) -> np.ndarray:
    """`[Nc, Nsel]` weights mapping compressed-block importance to selection blocks.

    NSA paper Eq. 9: `p_slc[j] = sum_{m < l'/d} sum_{n < l/d} p_cmp[(l'/d)*j - m - n]`, with the
    index aligned so that selection block j gathers exactly the compressed blocks overlapping
    it: `(l'/d)*(j + 1) - 1 - m - n`. Each compressed block is counted once per stride-length it
    shares with block j. With `l = l' = d` this is the identity; with `l' = d` it equals Eq. 9
    as printed (see `docs/nsa.md`).
    """
    nc, ns = cfg.num_cmp_blocks(t), cfg.num_sel_blocks(t)
    a, r = cfg.block_size // cfg.cmp_stride, cfg.cmp_block // cfg.cmp_stride
    w = np.zeros((nc, ns), np.float32)
    for j in range(ns):
        for m in range(a):
            for n in range(r):
                i = a * (j + 1) - 1 - m - n
                if 0 <= i < nc:
                    w[i, j] += 1.0
    return w


def forced_scores(score: Array, j: Array, cur: Array, first: Array, live: Array,
                  g: int) -> Array:
    """The selection rule on block scores (all arguments broadcast against each other).

    `score` is the importance of selection block `j` for a query in block `cur` whose segment
    starts in block `first` (`live`: not a padding query), `g` the GQA group size. Candidates
    are the blocks from `first` to `cur`; the current, previous and first block are forced, in
    that priority, by scores above any importance (a sum of `g` probabilities); the rest keep
    their importance and non-candidates get `-inf`. Shared by every backend's selection.
    """
    big = float(g) + 1.0
    cand = (j <= cur) & (j >= first) & live
    score = jnp.where(j == cur, big + 3.0, score)
    score = jnp.where((j == cur - 1) & cand, big + 2.0, score)
    score = jnp.where(j == first, big + 1.0, score)
    return jnp.where(cand, score, -jnp.inf)


def top_n_slots(score: Array, n: int) -> Array:
    """`idx [..., n]` int32 of the `n` best blocks of `score [..., Nsel]` (`lax.top_k`: ties go
    to the lower index); slots beyond the candidates (`-inf` scores) hold -1."""
    ns = score.shape[-1]
    top, idx = jax.lax.top_k(score, min(n, ns))
    idx = jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)
    return jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, n - idx.shape[-1])],
                   constant_values=-1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def select_blocks(
    q: Array,
    k_cmp: Array,
    lse: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
) -> Array:
    """Top-n selection blocks per query and KV head: `idx: [B, T, Hkv, n]` int32, -1 = unused.

    Importance of compressed block c for query t and KV head g: the compressed-attention
    probability `exp(q . k_c / sqrt(D) - lse)` summed over the G query heads of the group,
    mapped to selection blocks by `cmp_to_sel_weights`. Candidates are the blocks that start
    at or before t (inside the query's segment). The current block, the previous block and the
    first block (of the segment) are always selected, in that priority; the rest are the
    highest-scoring candidates. Slots beyond the number of candidates hold -1.

    Under `cfg.videonsa_compat` the selection is `videonsa_topk` (fla's top-k, which scores
    with its own rule rather than with the compat compressed-attention mask); `lse` is then
    still the true `[B, T, Hq]` log-sum-exp of `compressed_attention` (VideoNSA's layout
    accident is the compat layer's, see `nsa_jax.attention.compat.videonsa_lse`).
    Selection is not differentiable; inputs pass through `stop_gradient`.
    """
    b, t, hq, d = q.shape
    hkv = k_cmp.shape[2]
    nc, ns, n = cfg.num_cmp_blocks(t), cfg.num_sel_blocks(t), cfg.num_selected
    checks.check_trailing("k_cmp", k_cmp, (b, nc, hkv, d))
    checks.check_trailing("lse", lse, (b, t, hq))
    if cfg.videonsa_compat:
        return videonsa_topk(q, k_cmp, lse, cfg, segment_ids=segment_ids)
    q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
    seg = as_segments(segment_ids, b, t)
    blk_seg = cmp_block_segments(seg, cfg)
    seg_first_blk = segment_starts(seg) // cfg.block_size
    weights = jnp.asarray(cmp_to_sel_weights(t, cfg))
    c = query_chunk_size(t, cfg, 4 * hq * (nc + ns) * 4)
    tp = round_up(t, c)
    qp, segp, lsep = pad_time(q, tp), pad_time(seg, tp), pad_time(lse, tp)
    firstp = pad_time(seg_first_blk, tp)

    def chunk(start: Array) -> tuple[Array]:
        s = cmp_logits(qp, k_cmp, start, c, hkv)
        t_pos = start + jnp.arange(c)
        seg_q = time_slice(segp, start, c)
        vis = cmp_visible(t_pos, seg_q, blk_seg, cfg)[:, :, None, None, :]
        lse_c = time_slice(lsep, start, c).reshape(b, c, hkv, hq // hkv)[..., None]
        p = jnp.where(vis, jnp.exp(jnp.minimum(s - lse_c, 0.0)), 0.0).sum(3)  # [B,C,Hkv,Nc]
        score = jnp.einsum("bcgn,nj->bcgj", p, weights)
        cur = (t_pos // cfg.block_size)[None, :, None, None]  # [1, C, 1, 1]
        first = time_slice(firstp, start, c)[:, :, None, None]  # [B, C, 1, 1]
        live = (seg_q > 0)[:, :, None, None]
        score = forced_scores(score, jnp.arange(ns), cur, first, live, hq // hkv)
        idx = top_n_slots(score, n)
        return (idx,)

    (idx,) = map_query_chunks(chunk, t, c)
    return idx


# --------------------------------------------------------------------------- selected branch


@functools.partial(jax.jit, static_argnames=("cfg",))
def selected_attention(
    q: Array,
    k: Array,
    v: Array,
    idx: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
) -> Array:
    """Attention over the tokens of the selected blocks: `o: [B, T, Hq, D]`.

    Query `t`, head `h` attends to the tokens of blocks `idx[b, t, h // G, :]` (entries must be
    distinct; -1 slots are skipped) that are at or before `t` and in its segment.
    """
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    n = idx.shape[-1]
    checks.check_trailing("idx", idx, (b, t, hkv, n))
    lb = cfg.block_size
    ns = cfg.num_sel_blocks(t)
    seg = as_segments(segment_ids, b, t)
    c = query_chunk_size(t, cfg, 4 * (2 * hkv * d + hq) * n * lb)
    tp = round_up(t, c)
    kb = jnp.moveaxis(pad_time(k, ns * lb).reshape(b, ns, lb, hkv, d), 3, 1)  # [B,Hkv,Ns,l',D]
    vb = jnp.moveaxis(pad_time(v, ns * lb).reshape(b, ns, lb, hkv, d), 3, 1)
    seg_tok = pad_time(seg, ns * lb)  # padding tokens get segment 0: never visible
    qp, segp, idxp = pad_time(q, tp), pad_time(seg, tp), pad_time(idx, tp)
    bi = jnp.arange(b)[:, None, None, None]
    gi = jnp.arange(hkv)[None, None, :, None]

    def chunk(start: Array) -> tuple[Array]:
        qc = group_heads(time_slice(qp, start, c).astype(jnp.float32), hkv)
        ic = time_slice(idxp, start, c)  # [B, C, Hkv, n]
        safe = jnp.maximum(ic, 0)
        kg = kb[bi, gi, safe].astype(jnp.float32)  # [B, C, Hkv, n, l', D]
        vg = vb[bi, gi, safe].astype(jnp.float32)
        pos = safe[..., None] * lb + jnp.arange(lb)  # [B, C, Hkv, n, l']
        t_pos = (start + jnp.arange(c))[None, :, None, None, None]
        seg_q = time_slice(segp, start, c)[:, :, None, None, None]
        seg_k = seg_tok[jnp.arange(b)[:, None, None, None, None], pos]
        mask = (ic[..., None] >= 0) & (pos <= t_pos) & (seg_k == seg_q) & (seg_q > 0)
        s = jnp.einsum("bcgkd,bcgnld->bcgknl", qc, kg) * softmax_scale(d)
        s = s.reshape(b, c, hkv, hq // hkv, n * lb)
        mask = mask.reshape(b, c, hkv, 1, n * lb)
        p, _ = masked_softmax(s, mask)
        o = jnp.einsum("bcgkm,bcgmd->bcgkd", p, vg.reshape(b, c, hkv, n * lb, d))
        return (o.reshape(b, c, hq, d),)

    (o,) = map_query_chunks(chunk, t, c)
    return o.astype(q.dtype)


# --------------------------------------------------------------------------- window


@functools.partial(jax.jit, static_argnames=("window", "query_chunk"))
def sliding_window_attention(
    q: Array,
    k: Array,
    v: Array,
    window: int,
    *,
    segment_ids: Array | None = None,
    query_chunk: int = 128,
) -> Array:
    """Causal attention over the last `window` tokens (the query and `window - 1` before it).

    `window = 0` turns the branch off and returns zeros.
    """
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    if not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window must be a non-negative integer (0 = off), got {window!r}")
    if window == 0:
        return jnp.zeros_like(q)
    seg = as_segments(segment_ids, b, t)
    c = min(query_chunk, 1 << max(0, (t - 1).bit_length()))
    tp = round_up(t, c)
    span = c + window - 1
    front = [(0, 0), (window - 1, tp - t)]
    kp = jnp.pad(k, front + [(0, 0), (0, 0)])
    vp = jnp.pad(v, front + [(0, 0), (0, 0)])
    segk = jnp.pad(seg, front)  # front padding gets segment 0: never visible
    qp, segp = pad_time(q, tp), pad_time(seg, tp)

    def chunk(start: Array) -> tuple[Array]:
        qc = group_heads(time_slice(qp, start, c).astype(jnp.float32), hkv)
        kc = jax.lax.dynamic_slice_in_dim(kp, start, span, axis=1).astype(jnp.float32)
        vc = jax.lax.dynamic_slice_in_dim(vp, start, span, axis=1).astype(jnp.float32)
        sk = jax.lax.dynamic_slice_in_dim(segk, start, span, axis=1)  # [B, span]
        sq = time_slice(segp, start, c)
        t_pos = jnp.arange(c)[:, None] + window - 1  # query position inside the slice
        k_pos = jnp.arange(span)[None]
        band = (k_pos <= t_pos) & (k_pos > t_pos - window)  # [C, span]
        mask = band[None] & (sk[:, None, :] == sq[:, :, None]) & (sq[:, :, None] > 0)
        s = jnp.einsum("bcgkd,bsgd->bcgks", qc, kc) * softmax_scale(d)
        p, _ = masked_softmax(s, mask[:, :, None, None, :])
        o = jnp.einsum("bcgks,bsgd->bcgkd", p, vc)
        return (o.reshape(b, c, hq, d),)

    (o,) = map_query_chunks(chunk, t, c)
    return o.astype(q.dtype)


# --------------------------------------------------------------------------- whole NSA


@functools.partial(jax.jit, static_argnames=("cfg",))
def nsa_reference(
    q: Array,
    k: Array,
    v: Array,
    gates: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    compress_params: dict[str, Array] | None = None,
) -> Array:
    """NSA: `o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa`, `o: [B, T, Hq, D]`.

    `gates: [B, T, Hq, 3]` are already in (0, 1) (last axis: compressed, selected, window).
    Padding queries (segment 0) get zeros. Differentiable in q, k, v, gates and
    `compress_params`; the block selection itself is not (it only picks indices).
    """
    b, t, hq, hkv, d = checks.check_nsa_inputs(q, k, v, gates, segment_ids)
    k_cmp, v_cmp = compress_kv(k, v, cfg, compress_params)
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cfg, segment_ids=segment_ids)
    idx = select_blocks(q, k_cmp, lse, cfg, segment_ids=segment_ids)
    o_slc = selected_attention(q, k, v, idx, cfg, segment_ids=segment_ids)
    o_swa = sliding_window_attention(
        q, k, v, cfg.window, segment_ids=segment_ids, query_chunk=cfg.query_chunk
    )
    return combine_branches(gates, o_cmp, o_slc, o_swa)


def combine_branches(gates: Array, o_cmp: Array, o_slc: Array, o_swa: Array) -> Array:
    """Gate mix in f32: `gates: [B, T, Hq, 3]`, each `o: [B, T, Hq, D]` -> `[B, T, Hq, D]`."""
    g = gates.astype(jnp.float32)[..., None]
    o = sum(g[:, :, :, i] * x.astype(jnp.float32) for i, x in enumerate((o_cmp, o_slc, o_swa)))
    return o.astype(o_cmp.dtype)
