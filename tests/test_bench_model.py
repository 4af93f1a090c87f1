"""`experiments/bench_model.py`, `row_tiles.py` and `long_prefill.py` with `--quick` run end to
end on the CPU and write their results."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train_step import ROOT, subprocess_env


def test_quick_benchmark_writes_results_and_plots(tmp_path: pathlib.Path):
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_model.py"), "--quick",
           "--out", str(tmp_path), "--models", "dense", "--model-lengths", "256",
           "--layer-lengths", "128"]
    # unoptimised XLA code, as the other subprocess tests: the check is that every case runs
    # and reports, not how fast
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    model = next(r for r in results if r["mode"] == "model")
    layer = next(r for r in results if r["mode"] == "layer")
    assert "error" not in model
    assert 0.9 < 1 - model["text_rows"] / model["tokens"] < 1  # ~97% video tokens
    assert {"dense", "hybrid", "nsa", "text_rows"} == set(layer["methods"])
    assert all("ms" in m for m in layer["methods"].values()), layer["methods"]
    # each timed function ran twice (a warm-up, then `--quick`'s one timed run) in this run
    times = [model["step"], model["vision"], *layer["methods"].values()]
    assert all(0 < 2 * t["ms"] / 1e3 < wall for t in times), (wall, times)
    assert model["vision_share"] == model["vision"]["ms"] / model["step"]["ms"]
    m = layer["methods"]
    assert layer["text_share"] == (m["hybrid"]["ms"] - m["nsa"]["ms"]) / m["hybrid"]["ms"]
    for name in ("results.md", "model.png", "layer.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_row_tile_sweep_quick_times_each_candidate_and_its_share(tmp_path: pathlib.Path):
    cmd = [sys.executable, str(ROOT / "experiments" / "row_tiles.py"), "--quick",
           "--out", str(tmp_path), "--iters", "1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 2 and all("error" not in r for r in results), results
    for r in results:  # a warm-up and one timed run each, inside the run
        assert 0 < 2 * r["ms"] / 1e3 < wall and 0 < 2 * r["nsa_ms"] / 1e3 < wall, (wall, r)
        assert r["share"] == r["ms"] / (r["ms"] + r["nsa_ms"])
    assert (tmp_path / "results.md").read_text().count("\n") == 4


@pytest.mark.slow  # two tiny sweeps and their compiles: ~2.5 minutes on two busy cores
def test_long_prefill_quick_measures_both_variants_and_merges_them(tmp_path: pathlib.Path):
    cmd = [sys.executable, str(ROOT / "experiments" / "long_prefill.py"), "--quick",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "long_prefill.json").read_text())
    assert [r["length"] for r in merged["rows"]] == [1024, 2048]
    for r in merged["rows"]:
        h, d = r["hybrid"], r["dense"]
        assert 0.95 < h["video_fraction"] < 1 and len(h["layer_s"]) == h["layers"] == 2
        steady = h["vision_s"] + np.median(h["layer_s"][1:]) * 2
        assert h["prefill_s"] == pytest.approx(steady)
        assert d["prefill_s"] == pytest.approx(h["vision_s"] + d["layer_s"][1] * 2)
        assert r["speedup"] == pytest.approx(d["prefill_s"] / h["prefill_s"])
    assert merged["rows"][-1]["hybrid"]["decode_step_s"] > 0
    assert (tmp_path / "long_prefill.png").stat().st_size > 0
