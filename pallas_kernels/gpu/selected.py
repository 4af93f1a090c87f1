"""Selected-block attention in Pallas (Triton lowering), forward and backward.

Shapes (padded by the caller): `q: [B, T, Hq, D]`, `k, v: [B, T, Hkv, D]` with `T` a multiple
of the selection block `l'`, `seg: [B, T]` int32 (0 = padding), block indices
`idx: [B, T, Hkv, n]` int32 (`-1` = empty slot, entries distinct), `n` a power of two.
Query `t`, head `h` attends to the tokens of blocks `idx[b, t, h // G]` at or before `t` and in
its segment (the contract of `pallas_kernels.reference.selected_attention`).

Kernels:
- forward and dQ are *group-centric*: one program per (token, KV head) loads the G query heads
  of that KV head as one `[Gp, D]` tile (G padded to `Gp >= 16` rows for the tensor cores,
  padding rows masked) and walks the token's n blocks, so each K/V block is read once for all
  G heads. With `tokens = TB > 1` a program takes TB consecutive tokens (`TB * G` rows, e.g.
  2 x 7 = 14 of 16 rows for G = 7 instead of 7 of 16) and walks the union of their blocks,
  built in XLA (`tile_unions`) with a per-block bit set of the tokens that chose it; adjacent
  tokens mostly choose the same blocks, so a block fetch and a tensor-core product serve
  several tokens;
- dK/dV is *block-centric* (the loop swap of Flash Sparse Attention, Yan et al. 2025): the
  block indices are inverted into, for every (batch, KV head, block), the sorted list of tokens
  that selected it; each program takes one block and a bounded slice of its token list, gathers
  the query rows of those tokens (`rows // G` tokens, `rows % G` heads, packed without padding,
  so G = 7 fills 63 of 64 rows) and accumulates `dK, dV` for the block in registers, then adds
  them to the f32 result with one atomic add per program. Bounded slices keep the always-selected
  first block (chosen by every token) from serialising on one program;
- dQ is group-centric by default; with `dq_in_dkv` it comes from the block-centric kernel
  instead: each step's `dS K * scale` for its gathered rows is added to an f32 dQ by atomic
  adds, so each K/V block is read once for dK, dV and dQ. Measured at 128K it is 2x slower
  (Triton emits one atomic per element), so it is off; see docs/benchmarks.md.

`selected_attention` returns the branch alone; `selected_mixed` (what `nsa_attention` uses)
also takes the gates and the other branches' outputs and writes NSA's gate mix from the
forward's epilogue, so outside training the selected branch never reaches HBM on its own.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._compat import TritonCompilerParams, pl, pltriton
from pallas_kernels.gpu.banded import (
    dot,
    probs_and_ds,
    softmax_finish,
    softmax_init,
    softmax_step,
)
from pallas_kernels.lists import distinct_ascending
from pallas_kernels.numerics import cdiv
from pallas_kernels.operands import aliases, ordered

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SelParams:
    """Static description of one selected-attention call."""

    block: int  # selection block l'
    scale: float
    rows: int = 64  # gathered query rows per step of the dK/dV kernel
    item_chunks: int = 32  # steps per dK/dV program (bounds the work of one program)
    tokens: int = 1  # query tokens per forward / dQ program (> 1: token tiles, see below)
    dq_in_dkv: bool = False  # dQ by atomic adds from the block-centric dK/dV kernel
    num_warps: int = 4
    num_stages: int = 2
    group_warps: int = 0  # num_warps of the group-centric forward and dQ kernels (0: num_warps)
    interpret: bool = False


def group_pad(g: int) -> int:
    """Rows of the per-token query tile: G rounded up to a power of two, at least 16."""
    return max(16, 1 << max(0, (g - 1).bit_length()))


# --------------------------------------------------------------------------- forward / dQ


def _load_group(ref, b, t, h, g: int, gp: int):
    rmask = jnp.arange(gp) < g
    return pltriton.load(ref.at[b, t, pl.ds(h * g, gp), :], mask=rmask[:, None], other=0.0)


def _load_group_vec(ref, b, t, h, g: int, gp: int):
    rmask = jnp.arange(gp) < g
    return pltriton.load(ref.at[b, t, pl.ds(h * g, gp)], mask=rmask, other=0.0)


def _block_kv(k_ref, v_ref, seg_ref, idx_ref, b, t, h, i, segq, bs: int):
    """K, V `[bs, D]` of the token's i-th selected block and its `[bs]` visibility."""
    blk = idx_ref[b, t, h, i]
    safe = jnp.maximum(blk, 0)
    k = k_ref[b, pl.ds(safe * bs, bs), h, :]
    v = v_ref[b, pl.ds(safe * bs, bs), h, :]
    kpos = safe * bs + jnp.arange(bs)
    segk = seg_ref[b, pl.ds(safe * bs, bs)]
    vis = (blk >= 0) & (kpos <= t) & (segk == segq) & (segq > 0)
    return k, v, vis


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, idx_ref, *refs, p: SelParams, g: int,
                branches: int, keep: bool):
    """`branches = 0`: writes `o, lse`. Otherwise `refs` start with `gates` and the other
    branches' outputs (`o_cmp`, and `o_swa` when `branches = 2`), and the program writes the
    gate mix `o` (and the selected branch `o_slc` itself when `keep`) and `lse`."""
    n_in = branches + 1 if branches else 0
    ins, outs = refs[:n_in], refs[n_in:]
    t, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gp, bs = group_pad(g), p.block
    rmask = jnp.arange(gp) < g
    q = _load_group(q_ref, b, t, h, g, gp)
    segq = seg_ref[b, t]
    if branches:  # loaded before the block loop so their latency hides behind it
        gates = [pltriton.load(ins[0].at[b, t, pl.ds(h * g, gp), jnp.int32(i)], mask=rmask,
                               other=0.0) for i in range(branches + 1)]
        others = [_load_group(ref, b, t, h, g, gp) for ref in ins[1:]]

    def body(i, carry):
        k, v, vis = _block_kv(k_ref, v_ref, seg_ref, idx_ref, b, t, h, i, segq, bs)
        return softmax_step(carry, q, k, v, vis[None, :], p.scale)

    init = softmax_init(gp, q.shape[-1])
    o, lse = softmax_finish(lax.fori_loop(0, idx_ref.shape[-1], body, init))
    o_ref, lse_ref = outs[0], outs[-1]

    def store(ref, x):
        pltriton.store(ref.at[b, t, pl.ds(h * g, gp), :], x.astype(ref.dtype),
                       mask=rmask[:, None])

    if branches:
        gate = [x.astype(jnp.float32)[:, None] for x in gates]
        mixed = gate[0] * others[0].astype(jnp.float32) + gate[1] * o
        if branches == 2:
            mixed = mixed + gate[2] * others[1].astype(jnp.float32)
        store(o_ref, mixed)
        if keep:
            store(outs[1], o)
    else:
        store(o_ref, o)
    pltriton.store(lse_ref.at[b, t, pl.ds(h * g, gp)], lse, mask=rmask)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, idx_ref, do_ref, lse_ref, dl_ref, dq_ref, *,
               p: SelParams, g: int):
    t, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    gp, bs = group_pad(g), p.block
    q = _load_group(q_ref, b, t, h, g, gp)
    do = _load_group(do_ref, b, t, h, g, gp)
    lse = _load_group_vec(lse_ref, b, t, h, g, gp)
    dl = _load_group_vec(dl_ref, b, t, h, g, gp)
    segq = seg_ref[b, t]

    def body(i, dq):
        k, v, vis = _block_kv(k_ref, v_ref, seg_ref, idx_ref, b, t, h, i, segq, bs)
        _, ds = probs_and_ds(q, k, v, do, lse, dl, vis[None, :], p.scale)
        return dq + dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, idx_ref.shape[-1], body, jnp.zeros(q.shape, jnp.float32))
    rmask = jnp.arange(gp) < g
    pltriton.store(dq_ref.at[b, t, pl.ds(h * g, gp), :], (dq * p.scale).astype(dq_ref.dtype),
                   mask=rmask[:, None])


# --------------------------------------------------------------------------- token tiles


def tile_rows(g: int, tokens: int) -> int:
    """Rows of a token-tile program: `tokens * g` rounded up to a power of two, at least 16."""
    return max(16, 1 << max(0, (tokens * g - 1).bit_length()))


def tile_unions(idx: Array, tokens: int) -> tuple[Array, Array, Array]:
    """Per tile of `tokens` consecutive tokens and KV head, the union of their selections.

    `idx: [B, T, Hkv, n]` (`T % tokens == 0`) -> `blk, bits: [B, T/tokens, Hkv, tokens*n]`
    int32 and `count: [B, T/tokens, Hkv]`: the first `count` entries of `blk` are the distinct
    blocks, ascending; bit `j` of `bits` says whether the tile's token `j` chose that block.
    """
    b, t, hkv, n = idx.shape
    per_tok = jnp.moveaxis(idx.reshape(b, t // tokens, tokens, hkv, n), 3, 2)
    blk, count = distinct_ascending(per_tok.reshape(b, t // tokens, hkv, tokens * n))
    u = blk.shape[-1]

    def bits_of(blocks: Array, chosen: Array) -> Array:  # [U], [tokens, n] -> [U]
        pos = jnp.searchsorted(blocks, chosen)
        bit = jnp.where(chosen >= 0, 1 << jnp.arange(tokens, dtype=jnp.int32)[:, None], 0)
        return jnp.zeros(u, jnp.int32).at[pos.reshape(-1)].add(bit.reshape(-1), mode="drop")

    bits = jax.vmap(bits_of)(blk.reshape(-1, u), per_tok.reshape(-1, tokens, n))
    blk = jnp.where(jnp.arange(u) < count[..., None], blk, 0)
    return blk, bits.reshape(blk.shape), count


def _tile_ids(it, h, g: int, tokens: int, t: int):
    """Row `r` of tile `it` is token `it * tokens + r // g`, query head `h * g + r % g`."""
    r = jnp.arange(tile_rows(g, tokens))
    slot = r // g
    tok = it * tokens + slot
    return slot, tok, h * g + r % g, (slot < tokens) & (tok < t)


def _rows(ref, b, tok, head, ok):
    """Gathers `[R, D]` rows `ref[b, tok[r], head[r], :]` (0 where not ok)."""
    dcol = jnp.arange(ref.shape[-1])
    return pltriton.load(ref.at[b, tok[:, None], head[:, None], dcol[None, :]],
                         mask=ok[:, None], other=0.0)


def _tile_block(k_ref, v_ref, seg_ref, blk_ref, bits_ref, b, it, h, i, slot, tok, ok, segq,
                bs: int):
    """K, V `[bs, D]` of the tile's i-th union block and its `[R, bs]` visibility."""
    blk, bits = blk_ref[b, it, h, i], bits_ref[b, it, h, i]
    k = k_ref[b, pl.ds(blk * bs, bs), h, :]
    v = v_ref[b, pl.ds(blk * bs, bs), h, :]
    kpos = blk * bs + jnp.arange(bs)
    segk = seg_ref[b, pl.ds(blk * bs, bs)]
    chose = ok & (lax.shift_right_logical(bits, slot) & 1 == 1)
    vis = (chose[:, None] & (kpos[None, :] <= tok[:, None]) & (segk[None, :] == segq[:, None])
           & (segq[:, None] > 0))
    return k, v, vis


def _fwd_tile_kernel(q_ref, k_ref, v_ref, seg_ref, blk_ref, bits_ref, cnt_ref, o_ref, lse_ref,
                     *, p: SelParams, g: int):
    it, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot, tok, head, ok = _tile_ids(it, h, g, p.tokens, q_ref.shape[1])
    q = _rows(q_ref, b, tok, head, ok)
    segq = pltriton.load(seg_ref.at[b, tok], mask=ok, other=0)

    def body(i, carry):
        k, v, vis = _tile_block(k_ref, v_ref, seg_ref, blk_ref, bits_ref, b, it, h, i, slot,
                                tok, ok, segq, p.block)
        return softmax_step(carry, q, k, v, vis, p.scale)

    init = softmax_init(*q.shape)
    o, lse = softmax_finish(lax.fori_loop(0, cnt_ref[b, it, h], body, init))
    dcol = jnp.arange(q.shape[-1])
    pltriton.store(o_ref.at[b, tok[:, None], head[:, None], dcol[None, :]],
                   o.astype(o_ref.dtype), mask=ok[:, None])
    pltriton.store(lse_ref.at[b, tok, head], lse, mask=ok)


def _dq_tile_kernel(q_ref, k_ref, v_ref, seg_ref, blk_ref, bits_ref, cnt_ref, do_ref, lse_ref,
                    dl_ref, dq_ref, *, p: SelParams, g: int):
    it, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot, tok, head, ok = _tile_ids(it, h, g, p.tokens, q_ref.shape[1])
    q, do = _rows(q_ref, b, tok, head, ok), _rows(do_ref, b, tok, head, ok)
    lse = pltriton.load(lse_ref.at[b, tok, head], mask=ok, other=0.0)
    dl = pltriton.load(dl_ref.at[b, tok, head], mask=ok, other=0.0)
    segq = pltriton.load(seg_ref.at[b, tok], mask=ok, other=0)

    def body(i, dq):
        k, v, vis = _tile_block(k_ref, v_ref, seg_ref, blk_ref, bits_ref, b, it, h, i, slot,
                                tok, ok, segq, p.block)
        _, ds = probs_and_ds(q, k, v, do, lse, dl, vis, p.scale)
        return dq + dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, cnt_ref[b, it, h], body, jnp.zeros(q.shape, jnp.float32))
    dcol = jnp.arange(q.shape[-1])
    pltriton.store(dq_ref.at[b, tok[:, None], head[:, None], dcol[None, :]],
                   (dq * p.scale).astype(dq_ref.dtype), mask=ok[:, None])


# --------------------------------------------------------------------------- dK / dV


# the dK/dV kernel's operands before its accumulators, in `_dkv_kernel`'s order
DKV_OPERANDS = ("q", "k", "v", "seg", "do", "lse", "dl", "tok", "start", "end", "blk")


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, dl_ref, tok_ref, start_ref,
                end_ref, blk_ref, *refs, p: SelParams, g: int):
    # refs: the f32 accumulators as inputs (aliased), then as outputs: dk, dv (and dq)
    dk_ref, dv_ref = refs[len(refs) // 2:][:2]
    dq_ref = refs[-1] if p.dq_in_dkv else None
    w, h, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bs, rm = p.block, p.rows
    tq = rm // g  # tokens per step
    start, end, blk = start_ref[b, h, w], end_ref[b, h, w], blk_ref[b, h, w]
    k = k_ref[b, pl.ds(blk * bs, bs), h, :]
    v = v_ref[b, pl.ds(blk * bs, bs), h, :]
    segk = seg_ref[b, pl.ds(blk * bs, bs)]
    kpos = blk * bs + jnp.arange(bs)
    r = jnp.arange(rm)
    slot, head = r // g, h * g + r % g
    dcol = jnp.arange(k.shape[-1])
    last = tok_ref.shape[-1] - 1

    def body(ci, carry):
        dk, dv = carry
        e = start + ci * tq + slot
        ok = (slot < tq) & (e < end)
        tok = pltriton.load(tok_ref.at[b, h, jnp.minimum(e, last)], mask=ok, other=0)
        tok = jnp.where(ok, tok, 0)
        q = pltriton.load(q_ref.at[b, tok[:, None], head[:, None], dcol[None, :]],
                          mask=ok[:, None], other=0.0)
        do = pltriton.load(do_ref.at[b, tok[:, None], head[:, None], dcol[None, :]],
                           mask=ok[:, None], other=0.0)
        lse = pltriton.load(lse_ref.at[b, tok, head], mask=ok, other=0.0)
        dl = pltriton.load(dl_ref.at[b, tok, head], mask=ok, other=0.0)
        segq = pltriton.load(seg_ref.at[b, tok], mask=ok, other=0)
        vis = (ok[:, None] & (kpos[None, :] <= tok[:, None]) & (segk[None, :] == segq[:, None])
               & (segq[:, None] > 0))
        pr, ds = probs_and_ds(q, k, v, do, lse, dl, vis, p.scale)
        dv = dv + dot(pr.astype(do.dtype), do, trans_a=True)
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
        if dq_ref is not None:  # this block's share of the gathered rows' dQ
            # rows past the list add zeros to token 0 (the interpreter has no masked atomics;
            # Triton wants the mask in the value's shape)
            dq = jnp.where(ok[:, None], dot(ds.astype(k.dtype), k) * p.scale, 0.0)
            pltriton.atomic_add(dq_ref, (b, tok[:, None], head[:, None], dcol[None, :]), dq,
                                mask=None if p.interpret else jnp.broadcast_to(ok[:, None],
                                                                               dq.shape))
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    steps = lax.div(jnp.maximum(end - start, 0) + tq - 1, tq)
    dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))

    @pl.when(end > start)
    def _():
        rows = (b, pl.ds(blk * bs, bs), h, slice(None))
        pltriton.atomic_add(dk_ref, rows, dk * p.scale)
        pltriton.atomic_add(dv_ref, rows, dv)


def invert_indices(idx: Array, num_blocks: int, item_tokens: int) -> tuple[Array, ...]:
    """Inverts `idx: [B, T, Hkv, n]` into per-block token lists cut into bounded work items.

    Returns `tok: [B, Hkv, T*n]` (tokens sorted by selected block, ascending within a block;
    entries past the valid count are unused) and `start, end, blk: [B, Hkv, W]` int32 with
    `W = num_blocks + ceil(T*n / item_tokens)`: item `w` covers `tok[start:end]`, all of block
    `blk` (empty items have `start == end`).
    """
    b, t, hkv, n = idx.shape
    total = t * n
    key = jnp.moveaxis(jnp.where(idx >= 0, idx, num_blocks), 2, 1).reshape(b, hkv, total)
    tok = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, n)).reshape(total)
    tbits = max(1, (t - 1).bit_length())
    if (num_blocks + 1) << tbits < 2**31:  # one int32 sort key: (block, token)
        comb = jnp.sort((key << tbits) | tok, axis=-1)
        stok, sblk = comb & ((1 << tbits) - 1), comb >> tbits
    else:
        order = jnp.argsort(key, axis=-1, stable=True)
        stok, sblk = tok[order], jnp.take_along_axis(key, order, -1)
    nvalid = (key < num_blocks).sum(-1, dtype=jnp.int32)[..., None]
    firsts = jax.vmap(jax.vmap(lambda s: jnp.searchsorted(s, jnp.arange(num_blocks))))(sblk)
    cuts = jnp.broadcast_to(jnp.arange(0, total, item_tokens, dtype=jnp.int32),
                            (b, hkv, cdiv(total, item_tokens)))
    start = jnp.sort(jnp.concatenate([firsts.astype(jnp.int32), cuts], -1), -1)
    nxt = jnp.concatenate([start[..., 1:], jnp.full((b, hkv, 1), total, jnp.int32)], -1)
    end = jnp.maximum(jnp.minimum(nxt, nvalid), start)
    blk = jnp.take_along_axis(sblk, jnp.minimum(start, total - 1), -1)
    blk = jnp.where(end > start, blk, 0).astype(jnp.int32)
    return stok.astype(jnp.int32), start, end, blk


# --------------------------------------------------------------------------- wrappers


def _cp(p: SelParams, group: bool = False, rows: int = 0):
    """Launch parameters; `rows` of a token-tile program. A tile of 64 rows or more gets at
    least four warps: one warpgroup, which Hopper's wgmma needs (fewer fall back to mma.sync)."""
    warps = (p.group_warps or p.num_warps) if group else p.num_warps
    if rows >= 64:
        warps = max(warps, 4)
    return TritonCompilerParams(num_warps=warps, num_stages=p.num_stages)


def _tile_rows(p: SelParams, g: int) -> int:
    return tile_rows(g, p.tokens) if p.tokens > 1 else 0


def _lists(idx: Array, p: SelParams) -> tuple[Array, ...]:
    """What the forward / dQ programs walk: `(idx,)`, or the token tiles' unions."""
    if p.tokens == 1:
        return (idx,)
    if idx.shape[1] % p.tokens:
        raise ValueError(f"tokens ({p.tokens}) must divide the padded length {idx.shape[1]}")
    return tile_unions(idx, p.tokens)


def selected_forward(q, k, v, seg, idx, p: SelParams, mix: tuple[Array, ...] = (),
                     keep: bool = False):
    """`(o, lse)`; with `mix = (gates, o_cmp[, o_swa])` `o` is the gate mix, and `keep` adds
    the selected branch: `(o, o_slc, lse)`."""
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    if mix and p.tokens != 1:
        raise ValueError("the fused gate mix needs one token per program (tokens=1)")
    if keep and not mix:
        raise ValueError("keep=True returns the selected branch beside a gate mix: pass mix")
    kernel = (functools.partial(_fwd_kernel, branches=max(len(mix) - 1, 0), keep=keep)
              if p.tokens == 1 else _fwd_tile_kernel)
    o = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(
        functools.partial(kernel, p=p, g=g),
        grid=(t // p.tokens, k.shape[2], b),
        out_shape=[o, *([o] if keep else []), jax.ShapeDtypeStruct((b, t, hq), jnp.float32)],
        compiler_params=_cp(p, group=True, rows=_tile_rows(p, g)), interpret=p.interpret,
        name="nsa_selected_fwd",
    )(q, k, v, seg, *_lists(idx, p), *mix)


def _backward(q, k, v, seg, idx, o, lse, do, p: SelParams, dl: Array | None = None):
    """`(dq, dk, dv)`; `dl = rowsum(o * do)` `[B, T, Hq]` f32 when the caller has it."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    if dl is None:
        dl = jnp.einsum("bthd,bthd->bth", o.astype(jnp.float32), do.astype(jnp.float32))
    tq = max(1, p.rows // g)
    if p.rows < g:
        raise ValueError(f"rows ({p.rows}) must be at least the group size ({g})")
    tok, start, end, blk = invert_indices(idx, t // p.block, p.item_chunks * tq)
    acc = {"dk": jnp.zeros(k.shape, jnp.float32), "dv": jnp.zeros(k.shape, jnp.float32)}
    if p.dq_in_dkv:
        acc["dq"] = jnp.zeros(q.shape, jnp.float32)
    names = (*DKV_OPERANDS, *acc)  # the f32 accumulators last, aliased to the outputs
    grads = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p, g=g),
        grid=(start.shape[-1], hkv, b),
        out_shape=[jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in acc.values()],
        input_output_aliases=aliases(names, tuple(acc)),
        compiler_params=_cp(p), interpret=p.interpret, name="nsa_selected_dkv",
    )(*ordered(names, q=q, k=k, v=v, seg=seg, do=do, lse=lse, dl=dl, tok=tok, start=start,
               end=end, blk=blk, **acc))
    dk, dv = grads[0].astype(k.dtype), grads[1].astype(v.dtype)
    if p.dq_in_dkv:
        return grads[2].astype(q.dtype), dk, dv
    dq = pl.pallas_call(
        functools.partial(_dq_kernel if p.tokens == 1 else _dq_tile_kernel, p=p, g=g),
        grid=(t // p.tokens, hkv, b),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_cp(p, group=True, rows=_tile_rows(p, g)), interpret=p.interpret,
        name="nsa_selected_dq",
    )(q, k, v, seg, *_lists(idx, p), do, lse, dl)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def selected_attention(q: Array, k: Array, v: Array, seg: Array, idx: Array,
                       p: SelParams) -> Array:
    """Selected-block attention `o: [B, T, Hq, D]`; see the module docstring for shapes."""
    return selected_forward(q, k, v, seg, idx, p)[0]


def _vjp_fwd(q, k, v, seg, idx, p):
    o, lse = selected_forward(q, k, v, seg, idx, p)
    return o, (q, k, v, seg, idx, o, lse)


def _vjp_bwd(p, res, do):
    q, k, v, seg, idx, o, lse = res
    dq, dk, dv = _backward(q, k, v, seg, idx, o, lse, do, p)
    return dq, dk, dv, None, None


selected_attention.defvjp(_vjp_fwd, _vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def selected_mixed(q: Array, k: Array, v: Array, seg: Array, idx: Array, gates: Array,
                   o_cmp: Array, o_swa: Array | None, p: SelParams) -> Array:
    """NSA's output: the gate mix `g_cmp o_cmp + g_slc o_slc (+ g_swa o_swa)` in f32, with the
    selected branch `o_slc` computed and mixed in the same kernel (it never reaches HBM on its
    own outside training). `gates: [B, T, Hq, 3]`, `o_cmp, o_swa: [B, T, Hq, D]` (`o_swa`
    None: no window branch); the rest as `selected_attention`. Needs `p.tokens == 1`.
    """
    return selected_forward(q, k, v, seg, idx, p, _mix_inputs(gates, o_cmp, o_swa))[0]


def _mix_inputs(gates: Array, o_cmp: Array, o_swa: Array | None) -> tuple[Array, ...]:
    return (gates, o_cmp) if o_swa is None else (gates, o_cmp, o_swa)


def _mixed_fwd(q: Array, k: Array, v: Array, seg: Array, idx: Array, gates: Array, o_cmp: Array,
               o_swa: Array | None, p: SelParams) -> tuple[Array, tuple]:
    o, o_slc, lse = selected_forward(q, k, v, seg, idx, p, _mix_inputs(gates, o_cmp, o_swa),
                                     keep=True)
    return o, (q, k, v, seg, idx, o_slc, lse, gates, o_cmp, o_swa)


def _mixed_bwd(p: SelParams, res: tuple, do: Array) -> tuple:
    q, k, v, seg, idx, o_slc, lse, gates, o_cmp, o_swa = res
    f32 = jnp.float32
    do32, g32 = do.astype(f32), gates.astype(f32)
    # the gate gradients, rowsum(o_b * dO), are also the selected backward's delta / g_slc
    dg = [jnp.zeros(do.shape[:-1], f32) if x is None else jnp.sum(do32 * x.astype(f32), -1)
          for x in (o_cmp, o_slc, o_swa)]
    do_slc = (g32[..., 1:2] * do32).astype(do.dtype)
    dq, dk, dv = _backward(q, k, v, seg, idx, o_slc, lse, do_slc, p, dl=g32[..., 1] * dg[1])
    d_cmp = (g32[..., 0:1] * do32).astype(o_cmp.dtype)
    d_swa = None if o_swa is None else (g32[..., 2:3] * do32).astype(o_swa.dtype)
    return (dq, dk, dv, None, None, jnp.stack(dg, -1).astype(gates.dtype), d_cmp, d_swa)


selected_mixed.defvjp(_mixed_fwd, _mixed_bwd)
