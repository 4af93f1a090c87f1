"""Context parallelism (the `sequence` mesh axis) on 8 CPU devices: a hybrid layer's and a dense
layer's attention with the tokens sharded give the unsharded outputs and gradients, and the
tiny config's training steps give one device's losses (sequence=2 in `test_train_step.py`,
which shares the one-device run of the other meshes; with fsdp and data here under `-m slow`).

The device count is fixed when JAX starts, so `sequence_parallel_check.py` and
`sequence_parallel_train_check.py` run in subprocesses and write what is compared here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import AbstractMesh
from test_train_step import ROOT, assert_same_losses, subprocess_env

from nsa_jax.attention.sequence_parallel import SequenceParallel
from nsa_jax.model.vlm import count_along_tokens

from variants import VariantsTestCase


def check(tmp: Path, script: str, *args: str) -> dict:
    out = tmp / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / f"{script}.py"), str(out), *args],
        env=subprocess_env(8), capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_equal_to_unsharded(entry: dict) -> None:
    for name in ("hybrid", "dense"):
        e = entry[name]
        assert "sequence" in e["out_sharding"]  # the output stays on token shards
        assert e["out"] <= 1e-5 * e["out_scale"], (name, e)
        assert e["grad"] <= 1e-5 * e["grad_scale"], (name, e)


# Hq=16, Hkv=8: Ulysses splits whole GQA groups up to sequence=8. data=2 x sequence=4 also
# shards the batch. Hq=8, Hkv=2 on sequence=8: heads split 2 ways, K/V all-gathered over the
# other factor of 4 (the fallback beyond the KV heads).
LAYER_CASES = {
    "sequence=2/16/8": 2, "data=2,sequence=4/16/8": 4, "sequence=8/16/8": 8, "sequence=8/8/2": 2,
}


@pytest.fixture(scope="module")
def layers(tmp_path_factory) -> dict:
    return check(tmp_path_factory.mktemp("sp"), "sequence_parallel_check", *LAYER_CASES)


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_sharded_attention_equals_the_unsharded_layer(layers: dict, case: str) -> None:
    """Packed samples, padding and text rows at random positions, f32: outputs and the
    gradients of q, k, v (and the gate logits) match the unsharded layer."""
    assert layers[case]["head_degree"] == LAYER_CASES[case]
    assert_equal_to_unsharded(layers[case])


def assert_trains_as_one_device(tmp: Path, meshes: list[str]) -> None:
    result = check(tmp, "sequence_parallel_train_check", *meshes)
    for mesh in meshes:
        assert "sequence" in result[mesh]["input_ids"]  # the batch's tokens are on token shards
        assert_same_losses(result["1"]["records"], result[mesh]["records"])


@pytest.mark.slow
def test_sequence_with_fsdp_and_data_sharding_gives_one_devices_losses(tmp_path) -> None:
    """The tokens on `sequence` and the rows and parameters on `fsdp` (or the rows on `data`)."""
    assert_trains_as_one_device(tmp_path, ["fsdp=2,sequence=2", "data=2,sequence=2"])


def mesh_of(**sizes: int) -> AbstractMesh:
    axes = ("data", "fsdp", "tensor", "sequence")
    return AbstractMesh(tuple(sizes.get(a, 1) for a in axes), axes)


@pytest.mark.parametrize(("sizes", "hq", "hkv", "degree"), [
    ({"sequence": 4}, 28, 4, 4),  # Qwen2.5-VL-7B: Ulysses over its 4 KV heads
    ({"sequence": 8}, 28, 4, 4),  # then K/V all-gathered over the other factor of 2
    ({"sequence": 6}, 28, 4, 2),
    ({"tensor": 2, "sequence": 4}, 28, 4, 2),  # tensor takes a factor of the heads first
])
def test_the_heads_split_in_whole_gqa_groups(sizes: dict, hq: int, hkv: int,
                                             degree: int) -> None:
    assert SequenceParallel(mesh_of(**sizes)).head_degree(hq, hkv) == degree


def test_a_layout_the_heads_cannot_take_is_refused_naming_mesh_and_heads() -> None:
    """4 query heads over 3 KV heads, 2 KV heads over tensor=4, and a sequence that does not
    split over the axis are refused with the mesh named."""
    with pytest.raises(ValueError, match=r"'sequence': 2.*4 query and 3 KV heads"):
        SequenceParallel(mesh_of(sequence=2)).head_degree(4, 3)
    with pytest.raises(ValueError, match=r"'tensor': 4.*4 query and 2 KV heads"):
        SequenceParallel(mesh_of(tensor=4, sequence=2)).head_degree(4, 2)
    with pytest.raises(ValueError, match=r"100 tokens do not split over sequence=8"):
        SequenceParallel(mesh_of(sequence=8)).check(16, 8, 100)


def test_no_sequence_axis_means_no_context_parallelism() -> None:
    assert SequenceParallel.of(mesh_of(data=8)) is None
    assert SequenceParallel.of(mesh_of(sequence=2)) is not None


class TestRunningCount(VariantsTestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 5, 256, 1000, 4096, 131072)
    def test_the_running_count_of_placeholders_is_cumsums(self, t: int) -> None:
        mask = self.rng.random((3, t)) < np.array([[0.02], [0.5], [0.97]])
        got = np.asarray(self.variant(count_along_tokens)(mask))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.cumsum(mask, axis=1))


def test_no_cumulative_op_spans_the_token_axis() -> None:
    # with the tokens sharded, XLA lowers a cumulative op over them to a per-token loop on
    # the GPU (~130K kernels a step at 128K): placing the vision features sums blocks of
    # ~sqrt(T) tokens in turn, never the whole row
    import math

    import jax
    import jax.extend
    import jax.numpy as jnp
    import numpy as np

    from nsa_jax.model.vlm import scatter_row_features

    def cumulative_ops(jaxpr: jax.extend.core.Jaxpr) -> list[jax.extend.core.JaxprEqn]:
        found = []
        for e in jaxpr.eqns:
            if e.primitive.name.startswith("cum"):
                found.append(e)
            for p in e.params.values():
                inner = getattr(p, "jaxpr", p)  # closed jaxprs of nested jits
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found += cumulative_ops(inner)
        return found

    t, m, h = 131072, 1024, 8
    jaxpr = jax.make_jaxpr(scatter_row_features)(
        jnp.zeros((2, t, h)), np.zeros((2, t), bool), jnp.zeros((2, m, h)))
    scans = cumulative_ops(jaxpr.jaxpr)
    assert scans
    for e in scans:
        assert e.invars[0].aval.shape[e.params["axis"]] <= 2 * math.isqrt(t), e
