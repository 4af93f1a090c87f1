"""`nsa-jax tpu-compile`: the real train step, sharded over a described TPU slice, compiled by
libtpu on this CPU host; and the per-shard wrapper that lets Pallas kernels run inside a
sharded program (XLA does not partition them)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from test_train_step import ROOT, subprocess_env

from nsa_jax.train import sharding
from nsa_jax.train.batch import model_batch, synthetic_batch
from nsa_jax.train.config import load_config
from nsa_jax.train.tpu_compile import (
    GIB,
    CompileReport,
    PrefillReport,
    ProgramMemory,
    batch_spec,
)
from pallas_kernels.tpu import aot

needs_libtpu = pytest.mark.skipif(aot.libtpu_missing() is not None,
                                  reason=str(aot.libtpu_missing()))
# one decoder layer and one vision block: every kind of parameter and kernel, a short compile
SMALL = ["model.text.num_hidden_layers=1", "model.vision.depth=1",
         "model.vision.fullatt_block_indexes=0"]


def test_batch_spec_is_the_shape_of_a_real_batch() -> None:
    """The abstract micro-batch has the tree, static text-row slots, trailing shapes and
    dtypes `model_batch` gives real rows of its kind, every row, sharded over the batch axes."""
    cfg = load_config("tiny")
    mesh = sharding.make_mesh("", jax.devices()[:1])
    real = model_batch(synthetic_batch(cfg.model, 2, 192, answer_tokens=20), cfg.model)
    spec = batch_spec(cfg, 4, 192, 20, mesh)
    assert jax.tree.structure(spec) == jax.tree.structure(real)  # text_rows included
    for s, r in zip(jax.tree.leaves(spec), jax.tree.leaves(real), strict=True):
        assert s.shape == (4, *np.shape(r)[1:]) and s.dtype == np.asarray(r).dtype, (s, r)
        assert s.sharding == sharding.batch_sharding(mesh, s.ndim)


def test_report_says_when_a_step_does_not_fit() -> None:
    big = ProgramMemory(arguments=10 * GIB, outputs=GIB, aliased=GIB, temporaries=8 * GIB, code=0)
    small = ProgramMemory(arguments=10 * GIB, outputs=9 * GIB, aliased=9 * GIB, temporaries=0,
                          code=0)
    report = CompileReport(config="c", topology="v5e:2x2", chips=4, hosts=1, device_kind="TPU",
                           mesh={"data": 4}, rows=4, length=8, answer_tokens=16, text_rows=16,
                           grad_accum=1,
                           accumulate=big, apply=small, hbm_capacity=16 * GIB, compile_s=1.0)
    assert report.peak == 18 * GIB and not report.fits  # the larger program decides
    assert "step peak 18.00 GiB of 16.0 GiB per chip (112%): DOES NOT FIT" in report.table()
    assert report.to_json()["fits"] is False


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsa_jax.cli", "tpu-compile", *args],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)


def test_bad_topology_is_refused() -> None:
    proc = cli("--topology", "v9x:2x2", "--config", "tiny")
    assert proc.returncode == 2
    assert "topology 'v9x:2x2' is not GENERATION:AxB[xC]" in proc.stderr


@needs_libtpu
def test_tiny_train_step_compiles_for_v5e_2x2(tmp_path) -> None:
    """The whole step (vision tower, hybrid layers with the Pallas NSA kernels per shard,
    chunked loss, AdamW) over data=2 x fsdp=2 of a v5e 2x2 slice."""
    out = tmp_path / "report.json"
    proc = cli("--topology", "v5e:2x2", "--config", "tiny", "--answer-tokens", "16",
               "--json", str(out), "mesh=data=2,fsdp=2", *SMALL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tiny on v5e:2x2: 4 chips (TPU v5 lite, 1 host), mesh data=2,fsdp=2" in proc.stdout
    assert "of 16.0 GiB per chip" in proc.stdout and ": fits" in proc.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["compiled"] and report["rows"] == 8  # 2 a shard x 4
    assert report["length"] == 192 and report["answer_tokens"] == 16
    assert report["accumulate"]["temporaries"] > 0 and report["peak_bytes"] < 16 * GIB
    # the state and the gradient sum are donated to apply: aliased, not held twice
    assert report["apply"]["aliased"] > 0


@needs_libtpu
@pytest.mark.slow
def test_tiny_train_step_with_the_tokens_sharded_compiles_for_v5e_2x2(tmp_path) -> None:
    """Context parallelism on TPU: fsdp=2 x sequence=2, the NSA kernels called inside the
    sequence-parallel layer's shard_map (its backward once failed to lower there)."""
    out = tmp_path / "report.json"
    proc = cli("--topology", "v5e:2x2", "--config", "tiny", "--answer-tokens", "16",
               "--json", str(out), "mesh=fsdp=2,sequence=2", *SMALL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["fits"] and report["compiled"] and report["mesh"]["sequence"] == 2



def test_prefill_report_adds_the_resident_weights_and_caches_to_the_largest_program() -> None:
    small = ProgramMemory(arguments=GIB, outputs=GIB, aliased=GIB, temporaries=GIB, code=0)
    big = ProgramMemory(arguments=4 * GIB, outputs=2 * GIB, aliased=GIB, temporaries=5 * GIB,
                        code=0)
    report = PrefillReport(config="c", topology="v5p:2x2x1", chips=4, device_kind="TPU v5",
                           mesh={"sequence": 4}, length=1 << 20, text_rows=32768,
                           programs={"hybrid layer": big, "vision chunk": small},
                           weights=16 * GIB, layer_weights=GIB, cache_layer=2 * GIB, layers=28,
                           hbm_capacity=95 * GIB, compile_s=1.0)
    # all weights but the running layer's, every other layer's cache, the larger program
    assert report.resident == 15 * GIB + 27 * 2 * GIB
    assert report.peak == report.resident + 10 * GIB and report.peak / GIB == 79
    assert report.fits and "prefill peak 79.00 GiB of 95.0 GiB per chip (83%): fits" in (
        report.table())


@needs_libtpu
@pytest.mark.slow  # ~1.5 minutes on two busy cores
def test_tiny_prefill_with_the_tokens_sharded_compiles_for_v5e_2x2(tmp_path) -> None:
    """`--prefill`: a hybrid layer over 4096 tokens on sequence=4 (Ulysses, one chunk a shard)
    and the tower's chunk; the cache per chip is a quarter of a layer's."""
    out = tmp_path / "report.json"
    proc = cli("--prefill", "--topology", "v5e:2x2", "--config", "tiny", "--length", "4096",
               "--json", str(out), "mesh=sequence=4", *SMALL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tiny prefill on v5e:2x2: 4 chips" in proc.stdout and ": fits" in proc.stdout
    report = json.loads(out.read_text())
    assert report["fits"] and report["compiled"] and report["length"] == 4096
    assert set(report["programs"]) == {"hybrid layer", "vision chunk"}
    cfg = load_config("tiny", SMALL)
    t = cfg.model.text
    cache_len = 4096 + 256  # the prompt and 256 new tokens
    assert report["cache_layer"] == 2 * cache_len // 4 * t.num_key_value_heads * t.head_dim * 2
    # the layer's input, a quarter of the tokens a chip, is donated to its output
    itemsize = np.dtype(cfg.compute_dtype).itemsize
    assert report["programs"]["hybrid layer"]["aliased"] == 4096 // 4 * t.hidden_size * itemsize

PARTITION_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from nsa_jax.attention.partition import per_shard
    from nsa_jax.train.sharding import make_mesh
    from pallas_kernels.reference import NSAConfig, init_compress_params, nsa_reference
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = NSAConfig(block_size=8, num_selected=2, window=8, compression="mlp")
    b, t, hq, hkv, d = 4, 64, 4, 2, 16
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (b, t, hq, d))
    k = jax.random.normal(ks[1], (b, t, hkv, d))
    v = jax.random.normal(ks[2], (b, t, hkv, d))
    g = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, hq, 3)))
    seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 20 + [0] * 4], b, 0), jnp.int32)
    params = init_compress_params(ks[4], cfg, d, jnp.float32)
    def loss(fn, q, k, v, g, params):
        o = fn(q, k, v, g, cfg, segment_ids=seg, compress_params=params)
        return (o * jnp.cos(o)).sum(), o
    grad = lambda fn: jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3, 4),
                                                 has_aux=True))
    (_, want), want_g = grad(nsa_reference)(q, k, v, g, params)
    mesh = make_mesh("data=2,tensor=2,fsdp=2")
    with jax.set_mesh(mesh):
        (_, got), got_g = grad(per_shard(nsa_reference))(q, k, v, g, params)
        text = grad(per_shard(nsa_reference)).lower(q, k, v, g, params).as_text()
    assert "shard_map" in text or "manual" in text, "not run per shard"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    # inside a shard_map that made every axis manual (the sequence-parallel layer's), the
    # wrapper calls the kernel on the local arrays: the same values and gradients. The rows
    # split over `data` only leave 2 local rows, which `fsdp` divides but must not split again
    spec, rows = P("data", None, "tensor", None), P("data", None)
    def nested(q, k, v, g, cfg, *, segment_ids, compress_params):
        inner = lambda q, k, v, g, seg: per_shard(nsa_reference)(
            q, k, v, g, cfg, segment_ids=seg, compress_params=compress_params)
        return jax.shard_map(inner, in_specs=(spec,) * 4 + (rows,), out_specs=spec,
                             check_vma=False)(q, k, v, g, segment_ids)
    with jax.set_mesh(mesh):
        (_, got), got_g = grad(nested)(q, k, v, g, params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
    print("ok")
""")


def test_per_shard_nsa_equals_the_unsharded_call() -> None:
    """Under a data x fsdp x tensor mesh of 8 CPU devices, the per-shard wrapper (rows over
    data and fsdp, KV heads over tensor, the compression MLP shared) gives the unsharded
    outputs and gradients, those of the shared compression MLP included, also nested inside a
    shard_map over every axis (as the sequence-parallel layer calls it)."""
    proc = subprocess.run([sys.executable, "-c", PARTITION_CHECK], env=subprocess_env(8),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]
