"""Runs one hybrid layer's attention (and a dense layer's) with the tokens sharded over the
`sequence` axis of 8 CPU devices and writes how far outputs and gradients are from the
unsharded layer (`test_sequence_parallel.py` runs this in a subprocess, since the device
count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/sequence_parallel_check.py OUT.json CASE [CASE ...]

A case is `MESH/HQ/HKV` (e.g. `sequence=4/16/8`). Inputs: 2 rows of 128 tokens, f32; row 0
packs two samples and ends in padding, row 1 is one sample; text rows at random positions.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.attention.config import AttentionConfig
from nsa_jax.attention.dense import dense_attention
from nsa_jax.attention.hybrid import count_text_rows, hybrid_attention, text_row_bucket
from nsa_jax.attention.sequence_parallel import SequenceParallel, sequence_parallel_attention
from nsa_jax.train import sharding
from pallas_kernels.reference import NSAConfig

jax.config.update("jax_default_matmul_precision", "highest")

B, T, D = 2, 128, 16
CFG = NSAConfig(block_size=16, num_selected=3, window=24, query_chunk=64)


def inputs(hq: int, hkv: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    seg = np.ones((B, T), np.int32)
    seg[0, 50:] = 2  # two packed samples, then padding
    seg[0, 117:] = 0
    is_video = rng.random((B, T)) < 0.7  # text rows at random positions
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return {
        "q": f(B, T, hq, D), "k": f(B, T, hkv, D), "v": f(B, T, hkv, D),
        "logits": f(B, T, hq, 3), "do": f(B, T, hq, D),
        "is_video": jnp.asarray(is_video), "seg": jnp.asarray(seg),
        "rows": text_row_bucket(count_text_rows(~is_video & (seg > 0)), T),
    }


def hybrid(x: dict, sp: SequenceParallel | None):
    def attend(q, k, v, logits, is_video, seg):
        return hybrid_attention(q, k, v, logits, is_video,
                                AttentionConfig(nsa=CFG, implementation="reference"),
                                segment_ids=seg, text_rows=x["rows"])

    def loss(q, k, v, logits):
        if sp is None:
            o = attend(q, k, v, logits, x["is_video"], x["seg"])
        else:
            o = sequence_parallel_attention(attend, sp, q, k, v, (logits,),
                                            (x["is_video"], x["seg"]))
        return jnp.sum(o * x["do"]), o

    grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    return jax.jit(grad)(x["q"], x["k"], x["v"], x["logits"])


def dense(x: dict, sp: SequenceParallel | None):
    def loss(q, k, v):
        if sp is None:
            o = dense_attention(q, k, v, x["seg"])
        else:
            o = sequence_parallel_attention(lambda q, k, v, s: dense_attention(q, k, v, s), sp,
                                            q, k, v, token_arrays=(x["seg"],))
        return jnp.sum(o * x["do"]), o

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x["q"], x["k"], x["v"])


def max_err(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                              jax.tree.leaves(b), strict=True))


def main(out: str, cases: list[str]) -> None:
    result = {}
    unsharded = {}  # (hq, hkv) -> {name: (grads, out)}: one reference run per head layout
    for case in cases:
        spec, hq, hkv = case.split("/")
        x = inputs(int(hq), int(hkv))
        ref = unsharded.setdefault((hq, hkv), {})
        size = int(np.prod([int(item.split("=")[1]) for item in spec.split(",")]))
        mesh = sharding.make_mesh(spec, jax.devices()[:size])
        sp = SequenceParallel(mesh)
        entry = {"head_degree": sp.head_degree(int(hq), int(hkv))}
        for name, fn in (("hybrid", hybrid), ("dense", dense)):
            if name not in ref:
                ref[name] = fn(x, None)
            (grads_one, o_one) = ref[name]
            (grads_sp, o_sp) = fn(x, sp)
            entry[name] = {
                "out": max_err(o_one, o_sp), "grad": max_err(grads_one, grads_sp),
                "out_scale": float(jnp.max(jnp.abs(o_one))),
                "grad_scale": max(float(jnp.max(jnp.abs(g))) for g in grads_one),
                "out_sharding": str(o_sp.sharding.spec),
            }
        result[case] = entry
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
