"""`videonsa_topk` against fla's own Triton top-k kernel, run by Triton's CPU interpreter.

Opt-in: the kernel needs Triton, which the dev extra leaves out (torch CPU has no use for it),
and the fla release VideoNSA used, which PyPI ships as `flash-linear-attention==0.3.1` (fla-core
starts at 0.3.2). Set up once, outside the project's environment:

    python -m venv --system-site-packages /tmp/fla-venv && /tmp/fla-venv/bin/pip install triton
    pip download flash-linear-attention==0.3.1 --no-deps -d /tmp/w
    unzip /tmp/w/*.whl -d /tmp/fla031

then run with `NSA_FLA_PYTHON=/tmp/fla-venv/bin/python NSA_FLA_SRC=/tmp/fla031` (optionally
`NSA_FLA_VERSION=0.3.0` with that release unpacked instead). The kernel is launched directly,
past fla's autotuner (which wants a GPU to time configs), with its `exp`/`log` helpers
rewrapped as `triton.jit` functions so the interpreter can call them.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import textwrap

import numpy as np
import pytest

from nsa_jax.attention.compat import videonsa_lse
from pallas_kernels.reference import (
    NSAConfig,
    compress_kv,
    compressed_attention,
    videonsa_topk,
)

PYTHON, SRC = os.environ.get("NSA_FLA_PYTHON"), os.environ.get("NSA_FLA_SRC")
VERSION = os.environ.get("NSA_FLA_VERSION", "0.3.1")

# slow: it runs fla's Triton kernels in Triton's CPU interpreter, in a separate environment
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PYTHON and SRC),
                       reason="opt-in: set NSA_FLA_PYTHON and NSA_FLA_SRC (module docstring)"),
]

RUN_FLA = textwrap.dedent(
    """
    import os, sys, warnings
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    warnings.filterwarnings("ignore")
    import numpy as np, torch, triton
    import triton.language as tl
    import fla.ops.nsa.parallel as P

    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _log(x):
        return tl.log(x)

    P.exp, P.log = _exp, _log
    d = np.load(sys.argv[2])
    q, k, lse = (torch.from_numpy(d[x]) for x in ("q", "k_cmp", "lse"))
    B, T, HQ, K = q.shape
    H = k.shape[2]
    S, BS = triton.next_power_of_2(int(d["n"])), int(d["bs"])
    out = torch.zeros(B, T, H, S, dtype=torch.int32)
    P.parallel_nsa_kernel_topk.fn.fn[(T, B * H)](
        q=q, k=k, lse=lse, scale=K ** -0.5, block_indices=out, cu_seqlens=None,
        token_indices=None, chunk_offsets=None, T=T, H=H, HQ=HQ, G=HQ // H, K=K, S=S,
        BC=BS, BS=BS, BK=max(triton.next_power_of_2(K), 16), IS_VARLEN=False,
    )
    np.save(sys.argv[3], out.numpy())
    """
)


@pytest.mark.parametrize("layout", ["videonsa", "correct"])
def test_videonsa_topk_selects_what_fla_selects(rng, tmp_path: pathlib.Path, layout):
    hkv, d, t = 2, 16, 150
    cfg = NSAConfig(block_size=16, num_selected=4, window=0, videonsa_compat=True)
    q = rng.standard_normal((1, t, 16 * hkv, d)).astype(np.float32)  # VideoNSA's 16 per KV head
    k = rng.standard_normal((1, t, hkv, d)).astype(np.float32)
    k_cmp, v_cmp = compress_kv(k, k, cfg)
    _, lse = compressed_attention(q, k_cmp, v_cmp, cfg)
    lse = np.asarray(videonsa_lse(lse, layout))
    np.savez(tmp_path / "in.npz", q=q, k_cmp=np.asarray(k_cmp), lse=lse, n=4, bs=16)
    script = tmp_path / "run_fla.py"
    script.write_text(RUN_FLA)
    subprocess.run(
        [PYTHON, str(script), SRC, str(tmp_path / "in.npz"), str(tmp_path / "out.npy")],
        check=True,
        capture_output=True,
        timeout=900,
    )
    fla = np.load(tmp_path / "out.npy")
    ours = np.asarray(videonsa_topk(q, k_cmp, lse, cfg, fla_version=VERSION))
    # as sets: fla's bitonic sort orders ties (the forced blocks all score G) its own way
    np.testing.assert_array_equal(np.sort(fla, -1), np.sort(ours, -1))
