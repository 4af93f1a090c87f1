"""Selected-block attention forward in Pallas Mosaic GPU (TMA + wgmma): a prototype to compare
with the Triton lowering (`pallas_kernels.gpu.selected`, issue 6). Forward only, no VJP.
Measured slower than the Triton kernel at 128K (docs/benchmarks.md), so it lives here, beside
its test (`test_selected_mgpu.py`) and outside the installed package; the benchmark that
measured it is `experiments/bench_selected_backends.py`.

Same contract as `selected.selected_forward`: `q: [B, T, Hq, D]`, `k, v: [B, T, Hkv, D]` (T a
multiple of the block), `seg: [B, T]` int32 (0 = padding), `idx: [B, T, Hkv, n]` int32 (-1 = empty).
Returns `o: [B, T, Hq, D]` (q's dtype) and `lse: [B, T, Hq]` f32 (natural log; `-inf` and
`o = 0` for rows that see no key).

Layout: one program (one warpgroup, 128 threads) per (token tile, KV head, batch). A tile of
`tokens = TB` consecutive tokens gives `TB * G <= 64` query rows (row `r` is token
`it * TB + r // G`, head `h * G + r % G`; rows past `TB * G` are padding), padded to the
wgmma M = 64. When `G % 8 == 0` (the SMEM tile height) the program TMA-copies each token's G
query rows straight from `q` into its slice of the tile and the `o`, `lse` rows straight back
(`direct`, no layout work in XLA); otherwise XLA gathers the rows into
`qg: [B, Hkv, T/TB, 64, D]` before the call and scatters the 64-row outputs back after it (one
extra read + write of q and of o each). The program walks the union of the tile's selected
blocks (`selected.tile_unions`: ascending blocks, a per-block bit set of the tokens that chose
it, a count):
- K, V `[bs, D]` and the key segment ids `[bs]` of a block are TMA-copied (dynamic row offset
  `blk * bs`, scalar block ids read from GMEM) into one of `stages` SMEM slots, `stages - 1`
  blocks ahead of the one computed; the slot of block `i - 1` is refilled once block `i`'s
  `Q K^T` is done (wgmma is warpgroup-wide, so no warp still reads it);
- `S = Q K^T` by wgmma (Q and K from SMEM, f32 accumulator), mask from the row vectors
  (token, segment and the block's bit) and the column vectors (key position, key segment),
  online softmax in f32 (exp2 domain), `O += P V` by wgmma (P from registers, V from SMEM);
- `o` and `lse` go out through SMEM by TMA.
No warp specialisation and no overlap of block `i + 1`'s `Q K^T` with block `i`'s softmax
(FlashAttention-3's tricks): one warpgroup runs TMA issue, wgmma and softmax in turn, and two
programs share an SM (about 113 KB of SMEM each with D = 128 and 3 slots).

Off-GPU the kernel runs in jax's Mosaic GPU interpreter (simulated SMEM, TMA, barriers) with
three stand-ins, chosen by the static `interpreting` flag, for what jax 0.10's interpreter lacks:
`plgpu.load` with a layout and `plgpu.layout_cast` become plain reads / no-ops (layouts do not
exist there), and the two wgmmas become `dot_general`s of the SMEM contents (its wgmma takes
no transposed or register operand and it has no `run_state` rule). Everything else - TMA
offsets, barriers and slots, masks, softmax, the output path - is the code that compiles.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.selected import tile_unions
from pallas_kernels.numerics import NEG_INF

# --- version-dependent Mosaic GPU names (only this prototype uses Mosaic GPU) ---------------

try:  # the import pulls in Mosaic GPU's MLIR dialects; a jax without them just lacks the kernel
    from jax.experimental.pallas import mosaic_gpu as plgpu

    MGPU_AVAILABLE = True
except Exception:  # pragma: no cover - a jax without Mosaic GPU
    plgpu = None
    MGPU_AVAILABLE = False


def mgpu_vector_layouts() -> tuple[object, object]:
    """`(row, column)` layouts of the vectors reduced from a wgmma tile along its columns / rows
    (`Layout.WGMMA.reduce(1)`, `.reduce(0)` in jax 0.10; `WGMMA_ROW`, `WGMMA_COL` before)."""
    wgmma = plgpu.Layout.WGMMA
    if hasattr(wgmma, "reduce"):
        return wgmma.reduce(1), wgmma.reduce(0)
    return plgpu.Layout.WGMMA_ROW, plgpu.Layout.WGMMA_COL  # pragma: no cover - older jax


def mgpu_interpret_params() -> object:
    """`interpret=` value that runs a Mosaic GPU kernel in the GPU interpreter (simulated SMEM,
    TMA, barriers, wgmma) on a CPU (jax 0.10 keeps the class private)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as cls
    except ImportError:  # pragma: no cover - moved in a later jax
        cls = plgpu.InterpretParams
    return cls()


# --- the kernel ------------------------------------------------------------------------------

Array = jax.Array
_LOG2E = math.log2(math.e)
ROWS = 64  # wgmma M


def default_tokens(g: int) -> int:
    """Largest power of two `TB` with `TB * g <= 64` (4 for G = 16, 8 for G = 7)."""
    if g > ROWS:
        raise ValueError(f"group size {g} > {ROWS} rows")
    return 1 << ((ROWS // g).bit_length() - 1)


def gather_rows(x: Array, tokens: int, rows: int, hkv: int) -> Array:
    """`[B, T, Hkv*G, ...]` -> `[B, Hkv, T/TB, rows, ...]`: row `s * G + j` of tile `it` is
    token `it * TB + s`, head `h * G + j`; rows past `TB * G` are zeros."""
    b, t, hq = x.shape[:3]
    rest = x.shape[3:]
    g = hq // hkv
    y = x.reshape(b, t // tokens, tokens, hkv, g, *rest)
    y = jnp.moveaxis(y, 3, 1).reshape(b, hkv, t // tokens, tokens * g, *rest)
    pad = [(0, 0)] * y.ndim
    pad[3] = (0, rows - tokens * g)
    return jnp.pad(y, pad)


def scatter_rows(y: Array, tokens: int, g: int) -> Array:
    """Inverse of `gather_rows`: `[B, Hkv, NT, rows, ...]` -> `[B, T, Hkv*G, ...]`."""
    b, hkv, nt = y.shape[:3]
    rest = y.shape[4:]
    y = y[:, :, :, : tokens * g].reshape(b, hkv, nt, tokens, g, *rest)
    return jnp.moveaxis(y, 1, 3).reshape(b, nt * tokens, hkv * g, *rest)


def _load_vec(ref, layout, interpreting: bool):
    """A 1-D SMEM vector in registers with `layout` (a wgmma row or column vector).

    `plgpu.load` is what sets the layout when compiled; jax 0.10's GPU interpreter has no rule
    for it, so there the plain read stands in (the interpreter ignores layouts)."""
    if interpreting:
        return ref[...]
    return plgpu.load(ref, (), layout=layout)


def _cast(x, layout, interpreting: bool):
    """`plgpu.layout_cast` (no CPU lowering in jax 0.10's interpreter, where layouts are moot)."""
    return x if interpreting else plgpu.layout_cast(x, layout)


def _mma(acc, a, b_ref, *, trans_b: bool, interpreting: bool):
    """`acc + a @ b` (`b = b_ref^T` if `trans_b`) by one wgmma, f32 accumulation.

    `a` is an SMEM ref or a value in registers (WGMMA layout), `b_ref` an SMEM ref; `acc` is
    None (a fresh zero accumulator) or the running f32 value (`run_state` on an accumulator
    initialised from it, no extra add). jax 0.10's GPU interpreter runs wgmma only on untransposed
    SMEM operands and has no rule for `run_state`, so there the same product is a `dot_general`
    of the SMEM contents (what its wgmma would compute: an f32-accumulated matmul).
    """
    if interpreting:
        dims = (((1,), (1 if trans_b else 0,)), ((), ()))
        out = lax.dot_general(a[...], b_ref[...], dims, preferred_element_type=jnp.float32)
        return out if acc is None else acc + out
    b = plgpu.transpose_ref(b_ref, (1, 0)) if trans_b else b_ref

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    if acc is None:
        n = b_ref.shape[0] if trans_b else b_ref.shape[1]
        return pl.run_scoped(mma, plgpu.ACC((a.shape[0], n), jnp.float32))
    return pl.run_state(lambda r: plgpu.wgmma(r, a, b))(plgpu.ACC.init(acc))


def _kernel(q_ref, k_ref, v_ref, seg_ref, rseg_ref, rslot_ref, blk_ref, bits_ref, cnt_ref,
            o_ref, lse_ref, q_smem, k_smem, v_smem, sk_smem, rs_smem, rt_smem, lse_smem,
            q_bar, r_bar, k_bar, v_bar, s_bar, *, bs: int, scale: float, tokens: int, g: int,
            stages: int, direct: bool, interpreting: bool):
    it, h, b = lax.axis_index("tile"), lax.axis_index("kvh"), lax.axis_index("batch")
    d = q_smem.shape[-1]
    count = cnt_ref[b, h, it]

    heads = pl.ds(h * g, g)
    if direct:  # token j's G heads -> rows [j G, (j + 1) G) (whole (8, 64) tiles: G % 8 == 0)
        for j in range(tokens):
            plgpu.copy_gmem_to_smem(q_ref.at[b, it * tokens + j, heads],
                                    q_smem.at[pl.ds(j * g, g)], q_bar.at[j])
    else:  # the tile gathered by XLA
        plgpu.copy_gmem_to_smem(q_ref.at[b, h, it], q_smem, q_bar.at[0])
    plgpu.copy_gmem_to_smem(rseg_ref.at[b, it], rs_smem, r_bar.at[0])
    plgpu.copy_gmem_to_smem(rslot_ref, rt_smem, r_bar.at[1])

    def fetch(i, slot):
        blk = blk_ref[b, h, it, i]
        rows = pl.ds(blk * bs, bs)
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h], v_smem.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], sk_smem.at[slot], s_bar.at[slot])

    for j in range(stages - 1):  # prologue: the first `stages - 1` blocks in flight
        pl.when(j < count)(functools.partial(fetch, j, j))

    for j in range(tokens if direct else 1):
        plgpu.barrier_wait(q_bar.at[j])
    plgpu.barrier_wait(r_bar.at[0])
    plgpu.barrier_wait(r_bar.at[1])
    row_layout, col_layout = mgpu_vector_layouts()
    segq = _load_vec(rs_smem, row_layout, interpreting)  # [64] (0 on padding rows)
    slot_r = _load_vec(rt_smem, row_layout, interpreting)  # [64] token slot of each row
    tok_r = it * tokens + slot_r
    shape = (ROWS, bs)

    m0 = _cast(jnp.full((ROWS,), NEG_INF, jnp.float32), row_layout, interpreting)
    l0 = _cast(jnp.full((ROWS,), 0.0, jnp.float32), row_layout, interpreting)
    acc0 = _cast(jnp.full((ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA, interpreting)

    def body(i, carry):
        acc, m, l = carry
        slot = lax.rem(i, stages)
        blk = blk_ref[b, h, it, i]
        bits = bits_ref[b, h, it, i]
        plgpu.barrier_wait(k_bar.at[slot])
        s = _mma(None, q_smem, k_smem.at[slot], trans_b=True, interpreting=interpreting)
        # refill the slot of block i - 1 with block i + stages - 1: wgmma is warpgroup-wide, so
        # once this QK^T is done every warp is past step i - 1 and nothing reads that slot
        nxt = i + stages - 1

        @pl.when(nxt < count)
        def _():
            fetch(nxt, lax.rem(nxt, stages))

        plgpu.barrier_wait(s_bar.at[slot])
        segk = _load_vec(sk_smem.at[slot], col_layout, interpreting)
        chose = (lax.shift_right_logical(bits, slot_r) & 1) == 1
        segq_ok = jnp.where(chose & (segq > 0), segq, -1)  # -1 never equals a key segment
        kpos = blk * bs + _cast(lax.broadcasted_iota(jnp.int32, shape, 1), plgpu.Layout.WGMMA,
                                 interpreting)
        vis = ((kpos <= lax.broadcast_in_dim(tok_r, shape, [0]))
               & (lax.broadcast_in_dim(segk, shape, [1])
                  == lax.broadcast_in_dim(segq_ok, shape, [0])))
        s = jnp.where(vis, s * (scale * _LOG2E), NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(vis, jnp.exp2(s - lax.broadcast_in_dim(m_new, shape, [0])), 0.0)
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])

        acc = _mma(acc, p.astype(v_smem.dtype), v_smem.at[slot], trans_b=False,
                   interpreting=interpreting)
        return acc, m_new, l

    acc, m, l = lax.fori_loop(0, count, body, (acc0, m0, l0))
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
    q_smem[...] = o.astype(q_smem.dtype)
    lse_smem[...] = jnp.where(seen, m * (1.0 / _LOG2E) + jnp.log(l_safe), -jnp.inf)
    plgpu.commit_smem()
    if direct:
        for j in range(tokens):
            rows, tok = pl.ds(j * g, g), it * tokens + j
            plgpu.copy_smem_to_gmem(q_smem.at[rows], o_ref.at[b, tok, heads])
            plgpu.copy_smem_to_gmem(lse_smem.at[rows], lse_ref.at[b, tok, heads])
    else:
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h, it])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, it])
    plgpu.wait_smem_to_gmem(0)


def selected_forward_mgpu(q: Array, k: Array, v: Array, seg: Array, idx: Array, block: int,
                          scale: float, tokens: int | None = None, stages: int = 3,
                          direct: bool | None = None,
                          interpret: object = None) -> tuple[Array, Array]:
    """`(o [B, T, Hq, D], lse [B, T, Hq])` of selected attention (see the module docstring).

    `tokens`: tokens per program (`tokens * G <= 64`; default `default_tokens(G)`).
    `stages`: K/V SMEM slots (blocks in flight: `stages - 1` ahead of the one computed).
    `direct`: TMA q rows and o, lse rows straight from / to `[B, T, Hq, ...]`, one copy per
    token (needs `G % 8 == 0`, the SMEM tile height; default when it holds), instead of the XLA
    gather / scatter of 64-row tiles.
    `interpret`: Mosaic GPU interpret mode (default: on when the backend is not a GPU).
    """
    if not MGPU_AVAILABLE:
        raise RuntimeError("jax.experimental.pallas.mosaic_gpu is not importable here")
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    tokens = tokens or default_tokens(g)
    if tokens * g > ROWS:
        raise ValueError(f"tokens * G = {tokens} * {g} > {ROWS} rows")
    if t % tokens or t % block:
        raise ValueError(f"T = {t} must be a multiple of tokens ({tokens}) and block ({block})")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or d % 64:
        raise ValueError(f"bf16/f16 with D a multiple of 64 only (got {q.dtype}, D = {d})")
    if stages < 2:
        raise ValueError(f"stages ({stages}) must be at least 2")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if interpret is True:
        interpret = mgpu_interpret_params()
    nt = t // tokens
    blk, bits, count = tile_unions(idx, tokens)
    # [B, Hkv, NT, U] keeps one tile's list contiguous (scalar loads only, so any order works)
    blk, bits = (jnp.moveaxis(x, 2, 1).astype(jnp.int32) for x in (blk, bits))
    count = jnp.moveaxis(count, 2, 1).astype(jnp.int32)
    if direct is None:
        direct = g % 8 == 0
    if direct and g % 8:
        raise ValueError(f"direct q/o copies need G % 8 == 0 (G = {g})")
    slot_np = np.arange(ROWS) // g
    rslot = jnp.asarray(np.where(slot_np < tokens, slot_np, 31), jnp.int32)
    tok_rows = jnp.arange(nt)[:, None] * tokens + jnp.minimum(slot_np, tokens - 1)[None, :]
    rseg = jnp.where(jnp.asarray(slot_np < tokens)[None, None, :], seg[:, tok_rows], 0)
    rseg = rseg.astype(jnp.int32)  # [B, NT, 64]: each row's query segment, 0 on padding rows

    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    tr = (tiling, swizzle)
    dt = q.dtype
    kernel = plgpu.kernel(
        functools.partial(_kernel, bs=block, scale=scale, tokens=tokens, g=g, stages=stages,
                          direct=direct, interpreting=bool(interpret)),
        out_type=[jax.ShapeDtypeStruct(q.shape if direct else (b, hkv, nt, ROWS, d), dt),
                  jax.ShapeDtypeStruct((b, t, hq) if direct else (b, hkv, nt, ROWS),
                                       jnp.float32)],
        scratch_types=[
            plgpu.SMEM((ROWS, d), dt, transforms=tr),  # q, then o
            plgpu.SMEM((stages, block, d), dt, transforms=tr),  # k slots
            plgpu.SMEM((stages, block, d), dt, transforms=tr),  # v slots
            plgpu.SMEM((stages, block), jnp.int32),  # key segment slots
            plgpu.SMEM((ROWS,), jnp.int32),  # row segments
            plgpu.SMEM((ROWS,), jnp.int32),  # row token slots
            plgpu.SMEM((ROWS,), jnp.float32),  # lse out
            plgpu.Barrier(num_barriers=tokens if direct else 1),  # q
            plgpu.Barrier(num_barriers=2),  # row segments, row slots
            plgpu.Barrier(num_barriers=stages),  # k
            plgpu.Barrier(num_barriers=stages),  # v
            plgpu.Barrier(num_barriers=stages),  # key segments
        ],
        grid=(nt, hkv, b),
        grid_names=("tile", "kvh", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret or None,
    )
    qin = q if direct else gather_rows(q, tokens, ROWS, hkv)
    o, lse = kernel(qin, k, v, seg.astype(jnp.int32), rseg, rslot, blk, bits, count)
    if direct:
        return o, lse
    return scatter_rows(o, tokens, g), scatter_rows(lse, tokens, g)
