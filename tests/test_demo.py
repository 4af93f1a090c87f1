"""`nsa-jax demo` (nsa_jax/demo.py) and the `experiments/` studies' `--quick` modes.

The default run checks the report (table, figure, metrics read from a run's files, the
generate command); `-m slow` runs the whole demo at a toy size (then the command it prints)
and each experiment's `--quick` CPU mode, so none can rot.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
import yaml
from test_train_step import ROOT, subprocess_env

from nsa_jax import demo
from nsa_jax.cli import build_parser
from nsa_jax.data.synthetic import SyntheticConfig
from nsa_jax.train.config import CONFIGS, load_config, to_dict
from nsa_jax.train.step import ModelDef


def test_demo_config_matches_its_videos() -> None:
    cfg = load_config("demo")
    video = demo.video_config()
    assert isinstance(video, SyntheticConfig) and video.event_size == 1.0
    # every frame is sampled and a whole video fits one row with its question
    assert cfg.data.fps == video.fps and cfg.data.max_frames >= video.num_frames
    assert cfg.data.max_pixels >= video.height * video.width
    dense = load_config("demo", ["model.attention.nsa=null"])
    assert dense.model == cfg.model.with_attention(nsa=None)  # the twin differs by its gates only
    s = demo.sampling()
    assert (s.fps, s.max_frames, s.max_pixels) == (cfg.data.fps, cfg.data.max_frames,
                                                    cfg.data.max_pixels)
    args = build_parser().parse_args(["demo", "--out", "x", "--seed", "3", "optim.lr=1e-3"])
    assert (args.out, args.seed, args.overrides) == ("x", 3, ["optim.lr=1e-3"])


def _fake_run(run_dir, losses, tokens=(100, 120)) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(CONFIGS["demo"])))
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"step": i + 1, "loss": loss, "tokens": tokens[i % 2],
                                "step_time_s": 10.0 if i < 2 else 0.5}) + "\n")


def test_report_from_run_files(tmp_path) -> None:
    losses = [3.0, 2.0, 1.5, 1.0, 0.8, 0.5]
    _fake_run(tmp_path / "videonsa", losses)
    m = demo.training_metrics(str(tmp_path / "videonsa"))
    rows = CONFIGS["demo"].per_shard_batch
    assert m["steps"] == 6 and m["loss"] == losses
    assert m["tokens_per_s"] == pytest.approx((100 + 120) * 2 / 2.0)  # compiling steps skipped
    assert m["tokens_per_sample"] == pytest.approx(110 / rows)
    models = {k: {**m, "accuracy": {"needle": 90.0, "counting": 40.0, "order": 75.0},
                  "mean_accuracy": 68.3, "peak_rss_gib": 1.5, "train_wall_s": 100.0,
                  "train_cpu_s": 150.0}
              for k in demo.MODELS}
    chance = {t: 100 * c for t, c in demo.chance().items()}
    summary = {"seed": 0, "models": models, "chance": chance}
    text = demo.table(summary)
    assert "needle accuracy (%)" in text and "90.0" in text and "12.5" in text
    demo.plot(summary, str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    one = {"seed": 0, "models": {"videonsa": models["videonsa"]},  # `--models videonsa`
           "chance": chance}
    assert demo.LABELS["dense"] not in demo.table(one)
    demo.plot(one, str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").stat().st_size > 10_000
    assert demo.accuracy({t: {"overall": v} for t, v in zip(demo.TASKS, (90, 40, 50),
                                                            strict=True)}) == {
        "accuracy": dict(zip(demo.TASKS, (90, 40, 50), strict=True)), "mean_accuracy": 60.0}


def test_settings_train_on_a_subset_of_tasks() -> None:
    settings = demo.DemoSettings(train_tasks=("order",), models=("dense",))
    data = {"train": {"root": "r", "annotations": {t: f"{t}.jsonl" for t in demo.TASKS}}}
    cmd = demo.train_command("run", data, settings, dense=True)
    assert "annotations=order.jsonl" in cmd and "model.attention.nsa=null" in cmd
    args = build_parser().parse_args(["demo", "--train-tasks", "order", "--models", "dense"])
    assert (args.train_tasks, args.models) == ("order", "dense")
    with pytest.raises(ValueError, match="train_tasks"):
        demo.DemoSettings(train_tasks=("colours",))
    with pytest.raises(ValueError, match="models"):
        demo.DemoSettings(models=())


def test_synthetic_overrides_change_the_videos_not_the_training_run() -> None:
    overrides = ("synthetic.num_frames=160", "synthetic.max_count=4", "data.max_frames=160",
                 "optim.lr=1e-3")
    video = demo.video_config(overrides)
    assert (video.num_frames, video.max_count) == (160, 4)
    assert demo.video_config().num_frames == CONFIGS["demo"].synthetic.num_frames
    assert demo.chance(video)["counting"] == pytest.approx(1 / 4)
    data = {"train": {"root": "r", "annotations": {t: f"{t}.jsonl" for t in demo.TASKS}}}
    cmd = demo.train_command("run", data, demo.DemoSettings(overrides=overrides), dense=False)
    # the run reads the written files (synthetic=null); its own overrides pass through
    assert "synthetic=null" in cmd and not any(c.startswith("synthetic.") for c in cmd)
    assert "data.max_frames=160" in cmd and "optim.lr=1e-3" in cmd
    load_config("demo", cmd[cmd.index("demo") + 3:])  # the command's overrides load


def test_generate_command_names_a_held_out_video(tmp_path) -> None:
    root = tmp_path / "eval"
    root.mkdir()
    rec = {"id": "needle_00000", "video": "needle_00000.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat colour is it?"},
        {"from": "gpt", "value": "red"}]}
    (root / "needle.jsonl").write_text(json.dumps(rec) + "\n")
    data = {"eval": {"root": str(root), "annotations": {"needle": str(root / "needle.jsonl")}}}
    cmd, answer = demo.generate_command("ckpt", None, data, task="needle")
    argv = shlex.split(cmd)
    args = build_parser().parse_args(argv[1:])  # a valid `nsa-jax generate` command
    assert answer == "red" and args.prompt == "What colour is it?"
    assert args.video == str(root / "needle_00000.mp4") and args.ckpt == "ckpt"
    assert args.fps == CONFIGS["demo"].data.fps


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "nsa_jax.cli", "demo", "--out", str(out),
                           "--steps", "2", "--train-videos", "2", "--eval-videos", "1"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=3000,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "demo.json").read_text())
    for k in demo.MODELS:
        m = summary["models"][k]
        assert m["steps"] == 2 and m["peak_rss_gib"] > 0 and m["tokens_per_s"] > 0
        assert set(m["accuracy"]) == set(demo.TASKS)
        assert (out / k / "model" / "config.json").exists()
    assert (out / "demo.png").stat().st_size > 0
    assert "training tokens/s" in proc.stdout
    cmd = proc.stdout.strip().splitlines()[-1].strip()
    argv = shlex.split(cmd)
    assert argv[:2] == ["nsa-jax", "generate"]
    gen = subprocess.run([sys.executable, "-m", "nsa_jax.cli", *argv[1:]], env=subprocess_env(),
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert gen.returncode == 0, gen.stderr[-4000:]


def _experiment(name: str, tmp_path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), "--quick",
                           "--out", str(tmp_path), *extra], env=subprocess_env(),
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
def test_branch_usage_quick(tmp_path) -> None:
    result = _experiment("branch_usage", tmp_path)
    layers = CONFIGS["demo"].model.text.num_hidden_layers
    for task in demo.TASKS:
        gates = result["gates"][task]
        assert len(gates) == layers and all(len(g) == 3 for g in gates)
        # random init: VideoNSA's gate init (zero biases, N(0, 0.02) weights) gives ~0.5
        assert all(abs(v - 0.5) < 0.05 for g in gates for v in g)


@pytest.mark.slow
def test_attention_sinks_quick(tmp_path) -> None:
    result = _experiment("attention_sinks", tmp_path)
    for layer in result["videonsa"]:
        assert 0 <= layer["slc"] <= 1 and 0 <= layer["nsa_mix"] <= 1
        assert layer["compressed_share"] == pytest.approx(1 / 3, abs=0.05)
    assert len(result["dense"]) == len(result["videonsa"])


@pytest.mark.slow
def test_scaling_quick(tmp_path) -> None:
    start = time.perf_counter()
    result = _experiment("scaling", tmp_path)
    wall = time.perf_counter() - start
    got = {(r["mode"], r["variant"], r["length"]) for r in result["records"]}
    assert got == {(m, v, n) for m in ("train", "prefill") for v in ("hybrid", "dense")
                   for n in (128, 256)}
    cfg = load_config(result["config"], result["overrides"])
    for r in result["records"]:
        model = cfg.model if r["variant"] == "hybrid" else cfg.model.with_attention(nsa=None)
        # the f32 weights are arguments of every step, trained or prefilled (tiny: f32)
        shapes = ModelDef.of(model, jnp.float32, jnp.float32).shapes.values()
        weights = sum(s.size * s.dtype.itemsize for s in shapes)
        assert 0 < r["step_s"] < wall and r["memory_gib"] * 2**30 >= weights, (wall, r)


def test_a_scaling_sweep_over_several_calls_keeps_every_case(tmp_path, monkeypatch) -> None:
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling", ROOT / "experiments" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)

    def call(argv: list[str], records: list[dict]) -> dict:
        monkeypatch.setattr(sys, "argv", ["scaling.py", *argv])
        args = argparse.Namespace(out=tmp_path, name="scaling", config="gpu-small", overrides=[],
                                  quick=False)
        scaling.write_results(args, records, scaling.earlier_results(args))
        return json.loads((tmp_path / "scaling.json").read_text())

    def rec(mode: str, length: int, step_s: float) -> dict:
        return {"mode": mode, "variant": "hybrid", "length": length, "step_s": step_s,
                "memory_gib": 1.0}

    call(["--lengths", "8192,16384"], [rec("train", 8192, 1.0), rec("train", 16384, 2.5)])
    out = call(["--lengths", "16384"], [rec("train", 16384, 2.0)])
    # the second call measured 16K again: its value replaces the first's, 8K is kept
    assert [(r["length"], r["step_s"]) for r in out["records"]] == [(8192, 1.0), (16384, 2.0)]
    assert len(out["commands"]) == 2
    # another config's file is replaced, not merged
    monkeypatch.setattr(sys, "argv", ["scaling.py"])
    args = argparse.Namespace(out=tmp_path, name="scaling", config="tiny", overrides=[],
                              quick=True)
    assert scaling.earlier_results(args) is None


@pytest.mark.slow
def test_budget_split_quick(tmp_path) -> None:
    result = _experiment("budget_split", tmp_path, "--work", str(tmp_path / "runs"))
    nsa = CONFIGS["demo"].model.nsa
    for r in result["splits"]:
        assert r["num_selected"] * nsa.block_size + r["window"] == result["budget"]
        assert set(r["accuracy"]) == set(demo.TASKS)
    assert len(result["splits"]) == 2
    # the paper's protocol: one trained model scored at every split, only the split changed
    assert [(r["num_selected"], r["window"]) for r in result["inference"]] == [
        (r["num_selected"], r["window"]) for r in result["splits"]]
    tn, tw = result["inference_trained_at"]
    n, w = result["splits"][-1]["num_selected"], result["splits"][-1]["window"]
    config = json.loads((tmp_path / "runs" / f"sel{tn}_win{tw}" / "at_split" / f"sel{n}_win{w}"
                         / "config.json").read_text())
    assert (config["nsa"]["num_selected"], config["nsa"]["window"]) == (n, w) != (tn, tw)
    # at its own split the linked model scores exactly as the trained one
    same = [r for r in result["inference"] if (r["num_selected"], r["window"]) == (tn, tw)]
    trained = [r for r in result["splits"] if (r["num_selected"], r["window"]) == (tn, tw)]
    assert same[0]["accuracy"] == trained[0]["accuracy"]


@pytest.mark.slow
def test_demo_sweep_quick(tmp_path) -> None:
    result = _experiment("demo_sweep", tmp_path, "--work", str(tmp_path / "runs"),
                         "--setting", "lr;optim.lr=3e-3")
    (run,) = result["runs"]
    assert "error" not in run and run["setting"] == "lr"
    for k in demo.MODELS:
        assert set(run[k]["accuracy"]) == set(demo.TASKS)
    assert result["means"][0]["seeds"] == [0]


def test_demo_sweep_settings_parse(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import demo_sweep

    s = demo_sweep.parse_setting(
        "t4;steps=400;videos=512;tasks=order;models=videonsa;model.text.mrope_section=4,2,2")
    assert s == {"name": "t4", "steps": 400, "videos": 512, "tasks": "order",
                 "models": "videonsa", "overrides": ["model.text.mrope_section=4,2,2"]}
    assert demo_sweep.parse_setting("base")["steps"] is None
    with pytest.raises(ValueError, match="starts with a name"):
        demo_sweep.parse_setting("steps=3")
    cmd = demo_sweep.demo_command(s, 2, "out", 30)
    args = build_parser().parse_args(cmd[3:])  # a valid `nsa-jax demo` command line
    assert (args.steps, args.train_videos, args.seed) == (400, 512, 2)
    assert (args.train_tasks, args.models) == ("order", "videonsa")
    assert args.overrides == ["model.text.mrope_section=4,2,2"]


def test_a_child_shows_its_bar_and_logs_the_rest(tmp_path, capfd) -> None:
    """`child.run`: the tqdm redraws (split at `\\r`) go to this stderr, every other line of
    the child's stderr and stdout to the log; the exit status and the child's own times."""
    from nsa_jax import child

    script = ("import sys, time\n"
              "print('to the log', flush=True)\n"
              "for i in range(3):\n"
              "    sys.stderr.write(f'\\r{i}/3 [00:00, 2.00step/s]'); sys.stderr.flush()\n"
              "sys.stderr.write('\\nskipping a.mp4: FileNotFoundError\\n')\n"
              "t = time.process_time()\n"
              "while time.process_time() - t < 0.2: pass\n"
              "sys.exit(3)\n")
    stats = child.run([sys.executable, "-c", script], str(tmp_path / "log"))
    assert stats["status"] == 3 and 0.2 <= stats["cpu_s"] <= stats["wall_s"]
    assert stats["peak_rss_bytes"] > 1 << 20  # a Python interpreter's own
    log = (tmp_path / "log").read_text()
    assert "to the log\n" in log and "skipping a.mp4: FileNotFoundError\n" in log
    assert "step/s" not in log
    err = capfd.readouterr().err
    assert "\r2/3 [00:00, 2.00step/s]" in err and "skipping" not in err
    assert child.tail(str(tmp_path / "log"), 1) == "skipping a.mp4: FileNotFoundError\n"
