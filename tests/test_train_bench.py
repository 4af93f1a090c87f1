"""`experiments/bench_train.py --quick` (CPU smoke run of the GPU train benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_train_step import ROOT, subprocess_env


@pytest.mark.slow
def test_bench_train_quick_writes_json_and_plot(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_train.py"),
                           "--quick", "--profile", "--out", str(tmp_path)],
                          env=subprocess_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "results.json").read_text())
    records = {r["variant"]: r for r in result["records"]}
    assert set(records) == {"hybrid", "dense"}
    for r in records.values():
        assert r["tokens_per_s"] > 0 and r["compiled_step_gib"] > 0
        assert len(r["losses"]) == 3 and r["train_tflops_per_step"] > 0
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
