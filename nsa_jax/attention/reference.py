"""Native Sparse Attention in pure `jax.numpy`: the executable specification.

Every kernel backend (`pallas_kernels.tpu`, `pallas_kernels.gpu`) is checked against these
functions. Shapes: `q: [B, T, Hq, D]`, `k, v: [B, T, Hkv, D]` with `Hq = G * Hkv` (any group
size G), `gates: [B, T, Hq, 3]` (compressed, selected, window), block indices
`[B, T, Hkv, n]` int32 with -1 for empty slots, `segment_ids: [B, T]` (0 = padding).

Notation (the NSA paper's): compression block length `l = cfg.cmp_block`, stride
`d = cfg.cmp_stride`, selection block `l' = cfg.block_size`, `n = cfg.num_selected`, window `w`.
Compressed block `c` covers tokens `[c*d, c*d + l)`; selection block `j` covers
`[j*l', (j+1)*l')`. The maths is written out in `docs/nsa.md`.

Precision: inputs may be bf16 or f32; logits, softmax and accumulation are f32; outputs are
cast back to `q.dtype`.

Memory: every branch maps over query chunks (`lax.map`), so no `[T, T]` matrix is ever built.
Peak working set per chunk of `C` queries (f32):
- compressed: `B*C*Hq*(T/d)` logits;
- selected: gathered keys and values `2*B*C*Hkv*n*l'*D` plus `B*C*Hq*n*l'` logits;
- window: `B*C*Hq*(C + w - 1)` logits plus the `(C + w - 1)`-token K/V slice.
`C` is chosen so the selected branch's gather stays under `_CHUNK_BUDGET_BYTES` (128 MiB):
for T = 8192, Hq = 28, Hkv = 4, D = 128, n = 32, l' = 64 that is C = 16 and ~136 MiB peak
for the selected branch; the whole forward stays well under 1 GiB besides inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.attention import checks

_NEG = -1e30  # finite stand-in for -inf inside softmax: keeps gradients NaN-free
_CHUNK_BUDGET_BYTES = 128 * 2**20

Array = jax.Array
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
        return -(-t // self.cmp_stride)

    def num_sel_blocks(self, t: int) -> int:
        return -(-t // self.block_size)


# --------------------------------------------------------------------------- helpers


def _scale(d: int) -> float:
    return d**-0.5


def _segments(segment_ids: Array | None, b: int, t: int) -> Array:
    """Segment ids `[B, T]` int32; all ones (one sample, no padding) when absent."""
    if segment_ids is None:
        return jnp.ones((b, t), jnp.int32)
    return segment_ids.astype(jnp.int32)


def _segment_starts(seg: Array) -> Array:
    """`[B, T]` position of the first token of each token's segment."""
    t = seg.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)
    is_start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(is_start, pos[None], 0), axis=1)


def _cmp_block_segments(seg: Array, cfg: NSAConfig) -> Array:
    """`[B, Nc]` segment of each compressed block, or -1 when the block mixes segments."""
    b, t = seg.shape
    nc = cfg.num_cmp_blocks(t)
    tok = jnp.arange(nc)[:, None] * cfg.cmp_stride + jnp.arange(cfg.cmp_block)[None]
    present = tok < t
    s = seg[:, jnp.minimum(tok, t - 1)]  # [B, Nc, l]
    lo = jnp.where(present, s, jnp.iinfo(jnp.int32).max).min(-1)
    hi = jnp.where(present, s, jnp.iinfo(jnp.int32).min).max(-1)
    return jnp.where(lo == hi, lo, -1)


def _masked_softmax(s: Array, mask: Array) -> tuple[Array, Array]:
    """Softmax of f32 logits `s` over the last axis restricted to `mask`.

    Returns probabilities (0 where masked; all 0 for rows with nothing visible) and the
    log-sum-exp (`-inf` for rows with nothing visible).
    """
    s = jnp.where(mask, s, _NEG)
    any_visible = mask.any(-1, keepdims=True)
    m = jnp.where(any_visible, s.max(-1, keepdims=True), 0.0)
    e = jnp.where(mask, jnp.exp(s - m), 0.0)
    total = e.sum(-1, keepdims=True)
    p = e / jnp.where(any_visible, total, 1.0)
    lse = jnp.where(any_visible, m + jnp.log(jnp.where(any_visible, total, 1.0)), -jnp.inf)
    return p, lse[..., 0]


def _query_chunk(t: int, cfg: NSAConfig, per_query_bytes: int) -> int:
    c = max(1, min(cfg.query_chunk, _CHUNK_BUDGET_BYTES // max(per_query_bytes, 1)))
    c = 1 << (c.bit_length() - 1)  # a power of two keeps the chunk grid regular
    return min(c, 1 << max(0, (t - 1).bit_length()))


def _map_query_chunks(fn: Callable[[Array], tuple[Array, ...]], t: int, c: int) -> tuple:
    """Runs `fn(start)` for query chunks `[start, start + c)` and stitches outputs on axis 1.

    `fn` returns arrays of shape `[B, c, ...]`; the last partial chunk is computed padded and
    trimmed, so T need not be a multiple of `c`.
    """
    n = -(-t // c)
    outs = jax.lax.map(fn, jnp.arange(n, dtype=jnp.int32) * c)
    return tuple(
        jnp.moveaxis(o, 0, 1).reshape(o.shape[1], n * c, *o.shape[3:])[:, :t] for o in outs
    )


def _pad_time(x: Array, t_new: int) -> Array:
    return jnp.pad(x, [(0, 0), (0, t_new - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _chunk(x: Array, start: Array, c: int) -> Array:
    """`x[:, start:start + c]` of an array already padded along time."""
    return jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)


def _group(q: Array, hkv: int) -> Array:
    """`[B, C, Hq, D]` -> `[B, C, Hkv, G, D]` (query head h belongs to KV head h // G)."""
    b, c, hq, d = q.shape
    return q.reshape(b, c, hkv, hq // hkv, d)


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
    blocks = _pad_time(xf, int(tok.max()) + 1)[:, tok]  # [B, Nc, l, Hkv, D]
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


def _cmp_visible(t_pos: Array, seg_q: Array, blk_seg: Array, cfg: NSAConfig) -> Array:
    """`[B, C, Nc]`: may query at `t_pos` (`[C]`) see compressed block c?"""
    nc = blk_seg.shape[1]
    last = jnp.arange(nc) * cfg.cmp_stride + cfg.cmp_block - 1  # last token of each block
    # VideoNSA's released mask lets a query see its own and later blocks
    causal = t_pos[:, None] <= last[None] if cfg.videonsa_compat else last[None] <= t_pos[:, None]
    return causal[None] & (blk_seg[:, None, :] == seg_q[:, :, None]) & (seg_q[:, :, None] > 0)


def _cmp_logits(q: Array, k_cmp: Array, start: Array, c: int, hkv: int) -> Array:
    """Scaled f32 logits `[B, C, Hkv, G, Nc]` of a query chunk against compressed keys."""
    qc = _group(_chunk(q, start, c).astype(jnp.float32), hkv)
    return jnp.einsum("bcgkd,bngd->bcgkn", qc, k_cmp.astype(jnp.float32)) * _scale(q.shape[-1])


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
    seg = _segments(segment_ids, b, t)
    blk_seg = _cmp_block_segments(seg, cfg)
    c = _query_chunk(t, cfg, 4 * hq * nc * 4)
    tp = -(-t // c) * c
    qp, segp = _pad_time(q, tp), _pad_time(seg, tp)

    def chunk(start: Array) -> tuple[Array, Array]:
        s = _cmp_logits(qp, k_cmp, start, c, hkv)
        t_pos = start + jnp.arange(c)
        vis = _cmp_visible(t_pos, _chunk(segp, start, c), blk_seg, cfg)
        p, lse = _masked_softmax(s, vis[:, :, None, None, :])
        o = jnp.einsum("bcgkn,bngd->bcgkd", p, v_cmp.astype(jnp.float32))
        return o.reshape(b, c, hq, d), lse.reshape(b, c, hq)

    o, lse = _map_query_chunks(chunk, t, c)
    return o.astype(q.dtype), lse


# --------------------------------------------------------------------------- selection


def _cmp_to_sel_weights(t: int, cfg: NSAConfig) -> np.ndarray:
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
    mapped to selection blocks by `_cmp_to_sel_weights`. Candidates are the blocks that start
    at or before t (inside the query's segment). The current block, the previous block and the
    first block (of the segment) are always selected, in that priority; the rest are the
    highest-scoring candidates. Slots beyond the number of candidates hold -1.

    Under `cfg.videonsa_compat` the selection is `videonsa_topk` (fla's top-k, which scores
    with its own rule rather than with the compat compressed-attention mask); `lse` is then
    still the true `[B, T, Hq]` log-sum-exp of `compressed_attention` (VideoNSA's layout
    accident is the hybrid layer's, see `hybrid.videonsa_lse`).
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
    seg = _segments(segment_ids, b, t)
    blk_seg = _cmp_block_segments(seg, cfg)
    seg_first_blk = _segment_starts(seg) // cfg.block_size
    weights = jnp.asarray(_cmp_to_sel_weights(t, cfg))
    c = _query_chunk(t, cfg, 4 * hq * (nc + ns) * 4)
    tp = -(-t // c) * c
    qp, segp, lsep = _pad_time(q, tp), _pad_time(seg, tp), _pad_time(lse, tp)
    firstp = _pad_time(seg_first_blk, tp)

    def chunk(start: Array) -> tuple[Array]:
        s = _cmp_logits(qp, k_cmp, start, c, hkv)
        t_pos = start + jnp.arange(c)
        seg_q = _chunk(segp, start, c)
        vis = _cmp_visible(t_pos, seg_q, blk_seg, cfg)[:, :, None, None, :]
        lse_c = _chunk(lsep, start, c).reshape(b, c, hkv, hq // hkv)[..., None]
        p = jnp.where(vis, jnp.exp(jnp.minimum(s - lse_c, 0.0)), 0.0).sum(3)  # [B,C,Hkv,Nc]
        score = jnp.einsum("bcgn,nj->bcgj", p, weights)
        cur = (t_pos // cfg.block_size)[None, :, None, None]  # [1, C, 1, 1]
        first = _chunk(firstp, start, c)[:, :, None, None]  # [B, C, 1, 1]
        live = (seg_q > 0)[:, :, None, None]
        score = forced_scores(score, jnp.arange(ns), cur, first, live, hq // hkv)
        idx = top_n_slots(score, n)
        return (idx,)

    (idx,) = _map_query_chunks(chunk, t, c)
    return idx


@functools.partial(jax.jit, static_argnames=("cfg", "fla_version"))
def videonsa_topk(
    q: Array,
    k_cmp: Array,
    lse: Array,
    cfg: NSAConfig,
    *,
    segment_ids: Array | None = None,
    fla_version: FlaTopk = "0.3.1",
) -> Array:
    """fla's `parallel_nsa_topk`, the selection of VideoNSA (`select_blocks` under compat).

    `q [B, T, Hq, D]`, `k_cmp [B, Nc, Hkv, D]`, `lse [B, T, Hq]` (read as given: the caller
    decides its layout) -> `idx [B, T, Hkv, n]` int32, -1 = unused. Needs `l = d = l'`.

    fla computes its own scores and ignores which compressed blocks the compressed branch
    showed the query. For query t in block `cur = t // l'` and KV head g, candidates are the
    blocks `first <= j <= cur` (`first`: the block of the segment's first token; 0 without
    `segment_ids`), scored by the sum over the G heads of the group of
      - 1 for a forced block: `first`, `cur - 1` and `cur` in fla 0.3.1 (and every release
        since), only `cur` in fla <= 0.3.0;
      - `exp(q_h . k_j / sqrt(D) - lse[t, h])` for any other (earlier) block, unclamped: with
        VideoNSA's mask the lse sums over the query's own and later blocks, so this is no
        probability, may exceed 1, and can push a forced block (score G) out.
    The n highest are taken (ties: lower block first; fla's bitonic sort leaves their order
    unspecified); -1 fills slots beyond the candidates. With `segment_ids`, each segment is
    its own sequence on the row's block grid (fla's `cu_seqlens` mode when segments start on
    block multiples); padding queries get -1. Not differentiable.
    """
    if not cfg.cmp_block == cfg.cmp_stride == cfg.block_size:
        raise ValueError(
            "videonsa_compat selection (fla's top-k scores compressed blocks as selection "
            "blocks) needs compress_block == compress_stride == block_size, got "
            f"{cfg.cmp_block}, {cfg.cmp_stride}, {cfg.block_size}"
        )
    if fla_version not in ("0.3.1", "0.3.0"):
        raise ValueError(f"fla_version must be '0.3.1' or '0.3.0', got {fla_version!r}")
    b, t, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    n = cfg.num_selected
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of k_cmp's heads ({hkv})")
    checks.check_trailing("k_cmp", k_cmp, (b, cfg.num_cmp_blocks(t), hkv, d))
    checks.check_trailing("lse", lse, (b, t, hq))
    q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
    g = hq // hkv
    seg = _segments(segment_ids, b, t)
    c = _query_chunk(t, cfg, 4 * hq * nc * 4)
    tp = -(-t // c) * c
    qp, segp, lsep = _pad_time(q, tp), _pad_time(seg, tp), _pad_time(lse, tp)
    firstp = _pad_time(_segment_starts(seg) // cfg.block_size, tp)
    j = jnp.arange(nc)[None, None, None]  # [1, 1, 1, Nc]

    def chunk(start: Array) -> tuple[Array]:
        s = _cmp_logits(qp, k_cmp, start, c, hkv)  # [B, C, Hkv, G, Nc]
        lse_c = _chunk(lsep, start, c).reshape(b, c, hkv, g)[..., None]
        cur = ((start + jnp.arange(c)) // cfg.block_size)[None, :, None, None]  # [1, C, 1, 1]
        first = _chunk(firstp, start, c)[:, :, None, None]  # [B, C, 1, 1]
        live = (_chunk(segp, start, c) > 0)[:, :, None, None]
        cand = (j >= first) & (j <= cur) & live  # [B, C, 1, Nc]
        forced = j == cur
        if fla_version == "0.3.1":
            forced = forced | (j == first) | (j == cur - 1)
        # fla sets logits of blocks from `cur` on to -inf before the exp (so they add 0) and
        # overrides forced blocks with 1 per head afterwards
        p = jnp.where((j < cur)[..., None, :], jnp.exp(s - lse_c), 0.0).sum(3)  # [B,C,Hkv,Nc]
        score = jnp.where(cand, jnp.where(forced, float(g), p), -jnp.inf)
        top, idx = jax.lax.top_k(score, min(n, nc))
        idx = jnp.where(top > -jnp.inf, idx, -1).astype(jnp.int32)
        return (jnp.pad(idx, [(0, 0)] * 3 + [(0, max(0, n - nc))], constant_values=-1),)

    (idx,) = _map_query_chunks(chunk, t, c)
    return idx


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
    seg = _segments(segment_ids, b, t)
    c = _query_chunk(t, cfg, 4 * (2 * hkv * d + hq) * n * lb)
    tp = -(-t // c) * c
    kb = jnp.moveaxis(_pad_time(k, ns * lb).reshape(b, ns, lb, hkv, d), 3, 1)  # [B,Hkv,Ns,l',D]
    vb = jnp.moveaxis(_pad_time(v, ns * lb).reshape(b, ns, lb, hkv, d), 3, 1)
    seg_tok = _pad_time(seg, ns * lb)  # padding tokens get segment 0: never visible
    qp, segp, idxp = _pad_time(q, tp), _pad_time(seg, tp), _pad_time(idx, tp)
    bi = jnp.arange(b)[:, None, None, None]
    gi = jnp.arange(hkv)[None, None, :, None]

    def chunk(start: Array) -> tuple[Array]:
        qc = _group(_chunk(qp, start, c).astype(jnp.float32), hkv)
        ic = _chunk(idxp, start, c)  # [B, C, Hkv, n]
        safe = jnp.maximum(ic, 0)
        kg = kb[bi, gi, safe].astype(jnp.float32)  # [B, C, Hkv, n, l', D]
        vg = vb[bi, gi, safe].astype(jnp.float32)
        pos = safe[..., None] * lb + jnp.arange(lb)  # [B, C, Hkv, n, l']
        t_pos = (start + jnp.arange(c))[None, :, None, None, None]
        seg_q = _chunk(segp, start, c)[:, :, None, None, None]
        seg_k = seg_tok[jnp.arange(b)[:, None, None, None, None], pos]
        mask = (ic[..., None] >= 0) & (pos <= t_pos) & (seg_k == seg_q) & (seg_q > 0)
        s = jnp.einsum("bcgkd,bcgnld->bcgknl", qc, kg) * _scale(d)
        s = s.reshape(b, c, hkv, hq // hkv, n * lb)
        mask = mask.reshape(b, c, hkv, 1, n * lb)
        p, _ = _masked_softmax(s, mask)
        o = jnp.einsum("bcgkm,bcgmd->bcgkd", p, vg.reshape(b, c, hkv, n * lb, d))
        return (o.reshape(b, c, hq, d),)

    (o,) = _map_query_chunks(chunk, t, c)
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
    seg = _segments(segment_ids, b, t)
    c = min(query_chunk, 1 << max(0, (t - 1).bit_length()))
    tp = -(-t // c) * c
    span = c + window - 1
    front = [(0, 0), (window - 1, tp - t)]
    kp = jnp.pad(k, front + [(0, 0), (0, 0)])
    vp = jnp.pad(v, front + [(0, 0), (0, 0)])
    segk = jnp.pad(seg, front)  # front padding gets segment 0: never visible
    qp, segp = _pad_time(q, tp), _pad_time(seg, tp)

    def chunk(start: Array) -> tuple[Array]:
        qc = _group(_chunk(qp, start, c).astype(jnp.float32), hkv)
        kc = jax.lax.dynamic_slice_in_dim(kp, start, span, axis=1).astype(jnp.float32)
        vc = jax.lax.dynamic_slice_in_dim(vp, start, span, axis=1).astype(jnp.float32)
        sk = jax.lax.dynamic_slice_in_dim(segk, start, span, axis=1)  # [B, span]
        sq = _chunk(segp, start, c)
        t_pos = jnp.arange(c)[:, None] + window - 1  # query position inside the slice
        k_pos = jnp.arange(span)[None]
        band = (k_pos <= t_pos) & (k_pos > t_pos - window)  # [C, span]
        mask = band[None] & (sk[:, None, :] == sq[:, :, None]) & (sq[:, :, None] > 0)
        s = jnp.einsum("bcgkd,bsgd->bcgks", qc, kc) * _scale(d)
        p, _ = _masked_softmax(s, mask[:, :, None, None, :])
        o = jnp.einsum("bcgks,bsgd->bcgkd", p, vc)
        return (o.reshape(b, c, hq, d),)

    (o,) = _map_query_chunks(chunk, t, c)
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


@functools.partial(jax.jit, static_argnames=("implementation",))
def dense_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    *,
    implementation: str | None = None,
) -> Array:
    """Dense causal attention for text tokens: `[B, T, Hq, D]` over `[B, T, Hkv, D]`.

    Uses `jax.nn.dot_product_attention` with "cudnn" on a GPU and "xla" elsewhere, chosen by
    backend (cuDNN raises on a CPU-only machine). With `segment_ids`, queries attend only
    within their segment and padding queries (segment 0) return zeros.
    """
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    checks.check_segment_ids(segment_ids, b, t)
    if implementation is None:
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    seg = segment_ids.astype(jnp.int32)
    if implementation == "cudnn":
        # cuDNN takes no arbitrary mask: packed segments run through XLA.
        implementation = "xla"
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, :, None] > 0)
    o = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, implementation=implementation
    )
    return jnp.where(seg[:, :, None, None] > 0, o, 0).astype(q.dtype)


def flops_nsa(t: int, hq: int, d: int, cfg: NSAConfig) -> dict[str, float]:
    """Forward matmul FLOPs NSA needs per batch row (causal keys only; selection as if all
    `n` blocks were full and earlier than the query, an upper bound within one block)."""
    nc = cfg.num_cmp_blocks(t)
    cmp_keys = sum(max(0, min(nc, (tt - cfg.cmp_block) // cfg.cmp_stride + 1)) for tt in range(t))
    slc_keys = sum(min(cfg.num_selected * cfg.block_size, tt + 1) for tt in range(t))
    swa_keys = sum(min(tt + 1, cfg.window) for tt in range(t)) if cfg.window else 0
    per_key = 4 * hq * d  # QK^T and PV, 2 FLOPs per multiply-add
    return {
        "compressed": per_key * cmp_keys,
        "selected": per_key * slc_keys,
        "window": per_key * swa_keys,
        "total": per_key * (cmp_keys + slc_keys + swa_keys),
    }


def flops_dense(t: int, hq: int, d: int) -> float:
    """Forward matmul FLOPs of causal dense attention, per batch row."""
    return 4 * hq * d * t * (t + 1) / 2
