"""The reference against the public PyTorch peer: fla-core's naive NSA on the CPU.

fla-core installs without Triton, but `import fla.ops` then fails and its `mean_pooling` is a
Triton kernel, so the peer's pure-PyTorch file `fla/ops/nsa/naive.py` is executed on its own
with a small PyTorch mean pooling (a trailing partial block averages the tokens present, as
fla's kernel does) and `prepare_chunk_offsets` standing in for the two imports it needs.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from nsa_jax.attention import NSAConfig, nsa_attention


def _peer_naive_nsa():
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fla-core (dev extra) is missing: pip install -e '.[dev]'")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "ops" / "nsa" / "naive.py"
    src = path.read_text()
    src = src.replace("from fla.ops.utils import prepare_chunk_offsets\n", "")
    src = src.replace("from fla.ops.utils.pooling import mean_pooling\n", "")

    def mean_pooling(x, block, cu_seqlens=None):
        def pool(seq):  # [T, H, D] -> [ceil(T / block), H, D]
            return torch.stack([seq[i : i + block].mean(0) for i in range(0, seq.shape[0], block)])

        if cu_seqlens is None:
            return torch.stack([pool(x[b]) for b in range(x.shape[0])])
        bounds = cu_seqlens.tolist()
        return torch.cat([pool(x[0, s:e]) for s, e in zip(bounds[:-1], bounds[1:], strict=True)])[
            None
        ]

    def prepare_chunk_offsets(cu_seqlens, chunk):
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        return torch.nn.functional.pad((lens + chunk - 1) // chunk, (1, 0)).cumsum(-1)

    namespace = {"mean_pooling": mean_pooling, "prepare_chunk_offsets": prepare_chunk_offsets}
    exec(compile(src, str(path), "exec"), namespace)  # noqa: S102 - the peer's own source
    return namespace["naive_nsa"]


@pytest.fixture(scope="module")
def naive_nsa():
    return _peer_naive_nsa()


def _inputs(rng, b, t, hq, hkv, d):
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for h in (hq, hkv, hkv))
    gates = rng.uniform(0.05, 0.95, (b, t, hq, 3)).astype(np.float32)
    return q, k, v, gates


def _rel(x, ref) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def test_whole_nsa_matches_fla_naive(rng, naive_nsa):
    """Mean pooling, block 64, window 0, GQA ratio 16, T not a multiple of the block."""
    b, t, hq, hkv, d, n = 2, 520, 16, 1, 32, 4
    q, k, v, gates = _inputs(rng, b, t, hq, hkv, d)
    cfg = NSAConfig(block_size=64, num_selected=n, window=0)
    ours = np.asarray(nsa_attention(q, k, v, gates, cfg, implementation="reference"))
    tq = [torch.from_numpy(x) for x in (q, k, v)]
    peer = naive_nsa(
        *tq,
        g_cmp=torch.from_numpy(gates[..., 0]),
        g_slc=torch.from_numpy(gates[..., 1]),
        block_counts=n,
        block_size=64,
        window_size=0,
    ).numpy()
    assert _rel(ours, peer) <= 1e-5


def test_packed_rows_match_fla_varlen(rng, naive_nsa):
    """Our segment ids against fla's `cu_seqlens` (samples start on the 64-token block grid,
    where fla's per-sample block numbering and ours coincide)."""
    lens = (128, 200)
    t, hq, hkv, d, n = sum(lens), 16, 1, 32, 3
    q, k, v, gates = _inputs(rng, 1, t, hq, hkv, d)
    seg = np.repeat(np.arange(1, len(lens) + 1), lens)[None].astype(np.int32)
    cfg = NSAConfig(block_size=64, num_selected=n, window=0)
    ours = np.asarray(nsa_attention(q, k, v, gates, cfg, segment_ids=seg))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.long)
    peer = naive_nsa(
        *(torch.from_numpy(x) for x in (q, k, v)),
        g_cmp=torch.from_numpy(gates[..., 0]),
        g_slc=torch.from_numpy(gates[..., 1]),
        block_counts=n,
        block_size=64,
        window_size=0,
        cu_seqlens=cu,
    ).numpy()
    assert _rel(ours, peer) <= 1e-5
