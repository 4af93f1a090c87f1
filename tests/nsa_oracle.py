"""An independent float64 NumPy statement of NSA, written token by token.

This file is the tests' definition of NSA. It shares no code with `nsa_jax`: loops over batch,
query and head, explicit token sets, and the selection-block importance written as overlap
lengths (`docs/nsa.md`), not as the paper's index formula used by the implementation.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Spec:
    block: int  # selection block l'
    cmp_block: int  # compression block l
    stride: int  # compression stride d
    n: int  # selected blocks
    window: int
    compat: bool = False


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def softmax_attend(q: np.ndarray, keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, float]:
    """q [D], keys/vals [N, D] -> (o [D], lse); no keys -> (0, -inf)."""
    if len(keys) == 0:
        return np.zeros(q.shape[-1]), -np.inf
    s = keys @ q / np.sqrt(q.shape[-1])
    m = s.max()
    e = np.exp(s - m)
    return (e / e.sum()) @ vals, float(m + np.log(e.sum()))


def segments(seg: np.ndarray | None, b: int, t: int) -> np.ndarray:
    return np.ones((b, t), np.int64) if seg is None else np.asarray(seg, np.int64)


def seg_start(seg_row: np.ndarray, t: int) -> int:
    s = t
    while s > 0 and seg_row[s - 1] == seg_row[t]:
        s -= 1
    return s


def compress(x: np.ndarray, spec: Spec, params: dict | None, name: str) -> np.ndarray:
    """x [B, T, H, D] -> [B, Nc, H, D]; block c = tokens [c*d, c*d + l) inside the sequence."""
    b, t, h, d = x.shape
    nc = -(-t // spec.stride)
    out = np.zeros((b, nc, h, d))
    for c in range(nc):
        toks = [i for i in range(c * spec.stride, c * spec.stride + spec.cmp_block) if i < t]
        for bi in range(b):
            for hi in range(h):
                if params is None:
                    out[bi, c, hi] = x[bi, toks, hi].mean(0)
                else:
                    blk = np.zeros((spec.cmp_block, d))
                    blk[: len(toks)] = x[bi, toks, hi] + params[f"{name}_pos"][: len(toks)]
                    hid = gelu_tanh(blk.reshape(-1) @ params[f"{name}_w1"] + params[f"{name}_b1"])
                    out[bi, c, hi] = hid @ params[f"{name}_w2"] + params[f"{name}_b2"]
    return out


def cmp_visible(c: int, t: int, seg_row: np.ndarray, spec: Spec) -> bool:
    lo, hi = c * spec.stride, c * spec.stride + spec.cmp_block - 1
    if seg_row[t] == 0:
        return False
    ok = t <= hi if spec.compat else hi <= t
    toks = range(lo, min(hi, len(seg_row) - 1) + 1)
    return ok and all(seg_row[i] == seg_row[t] for i in toks)


def compressed(q, k_cmp, v_cmp, spec: Spec, seg=None):
    """-> o [B, T, Hq, D], lse [B, T, Hq], probs [B, T, Hq, Nc]."""
    b, t, hq, d = q.shape
    nc, hkv = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    seg = segments(seg, b, t)
    o, lse, probs = np.zeros((b, t, hq, d)), np.full((b, t, hq), -np.inf), np.zeros((b, t, hq, nc))
    for bi in range(b):
        for ti in range(t):
            vis = [c for c in range(nc) if cmp_visible(c, ti, seg[bi], spec)]
            for h in range(hq):
                o[bi, ti, h], lse[bi, ti, h] = softmax_attend(
                    q[bi, ti, h], k_cmp[bi, vis, h // g], v_cmp[bi, vis, h // g]
                )
                for c in vis:
                    s = k_cmp[bi, c, h // g] @ q[bi, ti, h] / np.sqrt(d)
                    probs[bi, ti, h, c] = np.exp(s - lse[bi, ti, h])
    return o, lse, probs


def sel_scores(probs: np.ndarray, hkv: int, t: int, spec: Spec) -> np.ndarray:
    """Group-summed compressed probabilities -> selection-block importance [B, T, Hkv, Ns].

    Compressed block c spreads its probability over the selection blocks it overlaps, in
    proportion to the overlap measured in strides.
    """
    b, _, hq, nc = probs.shape
    ns = -(-t // spec.block)
    grp = probs.reshape(b, t, hkv, hq // hkv, nc).sum(3)
    out = np.zeros((b, t, hkv, ns))
    for c in range(nc):
        c0, c1 = c * spec.stride, c * spec.stride + spec.cmp_block
        for j in range(ns):
            overlap = max(0, min(c1, (j + 1) * spec.block) - max(c0, j * spec.block))
            out[..., j] += grp[..., c] * overlap / spec.stride
    return out


def fla_topk(q, k_cmp, lse, spec: Spec, seg=None, version: str = "0.3.0") -> list:
    """VideoNSA's selection, fla's `parallel_nsa_topk` (read in the flash-linear-attention 0.3.0
    and 0.3.1 wheels), token by token -> sets[b][t][kv_head]. It takes the log-sum-exp as given
    and scores on its own, whatever the compressed branch showed the query: for query t in
    block cur, each head of the group counts 1 for a forced block (0.3.1: the first, previous
    and current block; 0.3.0: only the current) and `exp(q.k_c / sqrt(D) - lse)` for any other
    earlier block c; blocks after cur are no candidates; the n best win, ties to the lower
    block. With segments, each one is its own sequence on the row's block grid (fla's varlen
    mode when it starts on a block multiple); padding queries select nothing."""
    b, t, hq, d = q.shape
    hkv = k_cmp.shape[2]
    g = hq // hkv
    seg = segments(seg, b, t)
    out = []
    for bi in range(b):
        rows = []
        for ti in range(t):
            heads = []
            cur, first = ti // spec.block, seg_start(seg[bi], ti) // spec.block
            forced = {cur, cur - 1, first} if version == "0.3.1" else {cur}
            for kv in range(hkv):
                if seg[bi, ti] == 0:
                    heads.append(set())
                    continue
                score = {}
                group = range(kv * g, (kv + 1) * g)
                for c in range(first, cur + 1):
                    s = [
                        q[bi, ti, h] @ k_cmp[bi, c, kv] / np.sqrt(d) - lse[bi, ti, h] for h in group
                    ]
                    score[c] = float(g) if c in forced else float(np.exp(s).sum())
                heads.append(set(sorted(score, key=lambda c: (-score[c], c))[: spec.n]))
            rows.append(heads)
        out.append(rows)
    return out


def select(scores: np.ndarray, spec: Spec, seg=None) -> list:
    """-> sets[b][t][g]: the selected block ids (forced blocks first, then the top scores).
    The clean rule; `videonsa_compat` selects with `fla_topk` instead."""
    b, t, hkv, _ = scores.shape
    seg = segments(seg, b, t)
    out = []
    for bi in range(b):
        rows = []
        for ti in range(t):
            heads = []
            for g in range(hkv):
                if seg[bi, ti] == 0:
                    heads.append(set())
                    continue
                cur, first = ti // spec.block, seg_start(seg[bi], ti) // spec.block
                cands = list(range(first, cur + 1))
                forced = [cur, cur - 1, first]
                chosen = []
                for j in forced:
                    if j in cands and j not in chosen and len(chosen) < spec.n:
                        chosen.append(j)
                rest = sorted(
                    (j for j in cands if j not in chosen), key=lambda j: -scores[bi, ti, g, j]
                )
                chosen += rest[: spec.n - len(chosen)]
                heads.append(set(chosen))
            rows.append(heads)
        out.append(rows)
    return out


def selected(q, k, v, sets, spec: Spec, seg=None) -> np.ndarray:
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    seg = segments(seg, b, t)
    o = np.zeros((b, t, hq, d))
    for bi in range(b):
        for ti in range(t):
            for h in range(hq):
                toks = [
                    i
                    for j in sorted(sets[bi][ti][h // g])
                    for i in range(j * spec.block, (j + 1) * spec.block)
                    if i <= ti and seg[bi, i] == seg[bi, ti] and seg[bi, ti] > 0
                ]
                o[bi, ti, h], _ = softmax_attend(
                    q[bi, ti, h], k[bi, toks, h // g], v[bi, toks, h // g]
                )
    return o


def window(q, k, v, w: int, seg=None) -> np.ndarray:
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    seg = segments(seg, b, t)
    o = np.zeros((b, t, hq, d))
    if w == 0:
        return o
    for bi in range(b):
        for ti in range(t):
            toks = [i for i in range(max(0, ti - w + 1), ti + 1) if seg[bi, i] == seg[bi, ti] > 0]
            for h in range(hq):
                o[bi, ti, h], _ = softmax_attend(
                    q[bi, ti, h], k[bi, toks, h // g], v[bi, toks, h // g]
                )
    return o


def dense(q, k, v, seg=None) -> np.ndarray:
    b, t, _, _ = q.shape
    return window(q, k, v, t, seg)


def nsa(q, k, v, gates, spec: Spec, seg=None, params=None):
    """Whole NSA; returns (o, selection sets)."""
    q, k, v, gates = (np.asarray(x, np.float64) for x in (q, k, v, gates))
    params = None if params is None else {n: np.asarray(p, np.float64) for n, p in params.items()}
    k_cmp, v_cmp = compress(k, spec, params, "k"), compress(v, spec, params, "v")
    o_cmp, lse, probs = compressed(q, k_cmp, v_cmp, spec, seg)
    if spec.compat:
        sets = fla_topk(q, k_cmp, lse, spec, seg)
    else:
        sets = select(sel_scores(probs, k.shape[2], q.shape[1], spec), spec, seg)
    o_slc = selected(q, k, v, sets, spec, seg)
    o_swa = window(q, k, v, spec.window, seg)
    o = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_swa
    return o, sets
