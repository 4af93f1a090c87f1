"""`experiments/bench_train.py --quick` (CPU smoke run of the GPU train benchmark)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import jax
import pytest
from test_train_step import ROOT, subprocess_env

from nsa_jax.train import sharding
from nsa_jax.train.batch import model_batch, synthetic_batch
from nsa_jax.train.config import load_config
from nsa_jax.train.flops import batch_train_flops
from nsa_jax.train.step import Trainer


@pytest.mark.slow
def test_bench_train_quick_writes_json_and_plot(tmp_path) -> None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"),
                           "--quick", "--profile", "--out", str(tmp_path)],
                          env=subprocess_env(),
                          capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "results.json").read_text())
    records = {r["variant"]: r for r in result["records"]}
    assert set(records) == {"hybrid", "dense"}
    cfg = load_config(result["config"], result["overrides"])
    for variant, r in records.items():
        assert len(r["losses"]) == 3 and 0 < r["step_s"] * 3 < wall, (wall, r)
        # the batches `--quick` builds (4 answer tokens, 4 x 4 patch frames) give the tokens
        # and FLOPs of a step
        c = dataclasses.replace(cfg, model=cfg.model if variant == "hybrid"
                                else cfg.model.with_attention(nsa=None))
        raws = [synthetic_batch(c.model, r["rows"], r["length"], answer_tokens=4,
                                frame_patches=(4, 4), seed=i) for i in range(r["grad_accum"])]
        tokens = sum(int((b["segment_ids"] > 0).sum()) for b in raws)
        flops = sum(batch_train_flops(c.model, b, model_batch(b, c.model).answer_tokens)
                    for b in raws)
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(tokens, rel=1e-9)
        assert r["train_tflops_per_step"] == pytest.approx(flops / 1e12, rel=1e-9)
        # the whole train state is an argument of the compiled step
        state = Trainer.build(c, sharding.make_mesh(c.mesh)).abstract_state()
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        assert r["compiled_step_gib"] * 2**30 >= state_bytes, (r, state_bytes)
        # the traced step by part (nsa_jax.train.profile): every op the trace shows placed
        prof = r["profile"]
        assert prof["ops"] > 0 and prof["unmatched_ops"] == 0
        busy = sum(p["ms"] for k, p in prof["parts"].items() if k != "idle")
        assert busy >= prof["busy_ms"] * (1 - 1e-9)  # ops may overlap, never go missing
        assert prof["parts"]["lm_attention"]["ms"] > 0 and prof["parts"]["optimizer"]["ms"] > 0
        png = tmp_path / f"profile_{r['variant']}_128.png"
        assert png.stat().st_size > 0
    # the NSA model differs from its dense twin only by its gates and its attention
    assert records["hybrid"]["losses"] != records["dense"]["losses"]
    assert (tmp_path / "tokens_per_s.png").stat().st_size > 0
    compared = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"),
                               "--compare", str(tmp_path / "results.json"),
                               str(tmp_path / "results.json")], env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
    assert "worst 0.00e+00" in compared.stdout
    merged = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"),
                             "--merge", str(tmp_path / "results.json"),
                             str(tmp_path / "results.json"), "--out", str(tmp_path / "merged")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert merged.returncode == 0, merged.stderr[-4000:]
    assert len(json.loads((tmp_path / "merged" / "results.json").read_text())["records"]) == 4
    assert merged.stdout.count("| hybrid | 128 |") == 2
    assert (tmp_path / "merged" / "tokens_per_s.png").stat().st_size > 0
