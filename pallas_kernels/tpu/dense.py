"""Dense causal attention on TPU: JAX's splash attention with segment ids and any GQA ratio.

The contract of `nsa_jax.attention.dense.dense_attention` (same outputs: queries attend causally
within their segment, padding queries, segment 0, return zeros). The text rows of a hybrid
layer and the dense layers of a long-context model need it at 128K tokens, where a
`[B, 1, T, T]` mask and `[B, Hq, T, T]` logits do not fit.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) runs one KV head with
its group of `G` query heads (its MQA form: `q [G, T, D]`, `k, v [T, D]`, a causal mask per
head, `SegmentIds(q [T], kv [T])`); this wrapper maps it over batch rows and KV heads, scales
the queries by `D^-1/2` (splash does not), and pads T to the tile with segment 0. Its mask
lists are built once per (T, G, tiles) from the static causal mask, in NumPy, and its kernels
carry their own custom_vjp (dq and dk/dv kernels). Splash's matmuls take the configured
`jax_default_matmul_precision`, and Mosaic rejects "highest" (an f32 contract precision) on
bf16 operands: compile bf16 inputs under the default precision.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from pallas_kernels._compat import tpu_interpret
from pallas_kernels.numerics import round_up
from pallas_kernels.reference import checks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DenseBlockSizes:
    """Tiles of the splash kernels (forward, dq and dk/dv alike), multiples of 128.

    block_q: query tokens per tile; block_kv: keys per tile. A sequence shorter than a tile
    uses one tile of T rounded up to 128.
    """

    block_q: int = 512
    block_kv: int = 512

    def __post_init__(self) -> None:
        for name in ("block_q", "block_kv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 128:
                raise ValueError(f"{name} must be a positive multiple of 128, got {value!r}")


@functools.lru_cache(maxsize=64)
def _kernel(t: int, g: int, block_q: int, block_kv: int, interpret: bool):
    """Splash MQA for `G` causal heads over `t` tokens (`t` a multiple of both tiles):
    `(q [G, t, D], k, v [t, D], seg [t]) -> o [G, t, D]`, differentiable in q, k, v."""
    sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    mask = masks.MultiHeadMask([masks.CausalMask((t, t)) for _ in range(g)])
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)

    def attend(q: Array, k: Array, v: Array, seg: Array) -> Array:
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    return attend


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def dense_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None = None,
    *,
    block_sizes: DenseBlockSizes | None = None,
    interpret: object = None,
) -> Array:
    """Causal attention of `q [B, T, Hq, D]` over `k, v [B, T, Hkv, D]`: `o [B, T, Hq, D]` in
    q.dtype. With `segment_ids [B, T]` queries see only their segment and padding queries
    (segment 0) return zeros. Differentiable in q, k, v; `interpret` as the NSA kernels'."""
    b, t, hq, hkv, d = checks.check_qkv(q, k, v)
    checks.check_segment_ids(segment_ids, b, t)
    bsz = block_sizes or DenseBlockSizes()
    short = round_up(t, 128)
    bq, bkv = min(bsz.block_q, short), min(bsz.block_kv, short)
    tp = round_up(t, max(bq, bkv))
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.pad(seg, [(0, 0), (0, tp - t)])  # padding tokens: segment 0

    def heads(x: Array) -> Array:  # [B, T, H, D] -> [B, H, Tp, D]
        return jnp.pad(x, [(0, 0), (0, tp - t), (0, 0), (0, 0)]).transpose(0, 2, 1, 3)

    g = hq // hkv
    qh = heads(q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, hkv, g, tp, d)
    # off-TPU splash runs in Pallas's generic interpreter: its dq kernel's dimension semantics
    # name fewer axes than its grid, which the TPU interpreter rejects (jax 0.10)
    attend = _kernel(tp, g, bq, bkv, bool(tpu_interpret(interpret)))
    over_heads = jax.vmap(attend, in_axes=(0, 0, 0, None))
    o = jax.vmap(over_heads)(qh, heads(k), heads(v), seg)  # [B, Hkv, G, Tp, D]
    o = o.reshape(b, hq, tp, d).transpose(0, 2, 1, 3)[:, :t]
    return jnp.where(seg[:, :t, None, None] > 0, o, 0).astype(q.dtype)
