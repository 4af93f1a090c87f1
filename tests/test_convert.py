"""Checkpoint conversion, `nsa-jax convert`: Hugging Face <-> orbax, both ways, bit for bit.

torch and transformers are dev dependencies, imported directly: without them these tests fail
rather than skip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLConfig

from nsa_jax import cli
from nsa_jax import config as config_module
from nsa_jax.config import VIDEONSA_ARCH, ModelConfig, preset
from nsa_jax.convert import checkpoint as checkpoint_module
from nsa_jax.convert import hf as hf_module
from nsa_jax.convert import load_model, names
from nsa_jax.convert.checkpoint import save_checkpoint
from nsa_jax.convert.hf import INDEX, read_hf, weight_map, write_hf
from nsa_jax.convert.lazy import LazyArray
from nsa_jax.convert.load import model_from_params, params_of
from nsa_jax.model.vlm import init_model

from hf_fixtures import (
    TINY,
    hf_logits,
    make_published_videonsa,
    make_tiny_hf_checkpoint,
    newer_key,
    random_prompt,
)

Tensors = dict[str, np.ndarray]
# files a Hugging Face directory carries beside the weights; conversion keeps them
TOKENIZER_FILES = {
    "tokenizer_config.json": '{"model_max_length": 32768}',
    "chat_template.jinja": "{{ x }}",
}


def hf_tensors(hf_dir: str) -> Tensors:
    """Every tensor of an HF directory, whatever its sharding, as stored."""
    out: Tensors = {}
    for file in sorted(set(weight_map(hf_dir).values())):
        out.update(load_file(file))
    return out


def rewrite_tensors(hf_dir: str, edit: Callable[[Tensors], Tensors]) -> None:
    """Replaces the tensors of a single-file HF directory by `edit(tensors)`."""
    path = os.path.join(hf_dir, "model.safetensors")
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


def convert(*argv: str) -> int:
    return cli.main(["convert", *argv])


def round_trip(src: str, tmp: str, *, max_shard_gb: float | None = 5.0) -> str:
    """HF -> ours -> HF through the command line (resharded to `max_shard_gb`, or in the
    source's files when None); returns the new HF directory."""
    ckpt, out = os.path.join(tmp, "ckpt"), os.path.join(tmp, "hf")
    assert convert("hf-to-jax", "--hf", src, "--out", ckpt) == 0
    shard = [] if max_shard_gb is None else ["--max-shard-gb", str(max_shard_gb)]
    assert convert("jax-to-hf", "--ckpt", ckpt, "--out", out, *shard) == 0
    return out


@pytest.fixture(scope="module")
def plain_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, torch.nn.Module]:
    """A tiny random Qwen2.5-VL in float32, with tokenizer files beside it."""
    path = str(tmp_path_factory.mktemp("plain_hf"))
    model = make_tiny_hf_checkpoint(path)
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path, model


@pytest.fixture(scope="module")
def nsa_hf(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random VideoNSA checkpoint (gate weights under VideoNSA's names) in bfloat16."""
    path = str(tmp_path_factory.mktemp("nsa_hf"))
    make_tiny_hf_checkpoint(path, nsa_gates=True)
    rewrite_tensors(path, lambda ts: {k: v.astype(ml_dtypes.bfloat16) for k, v in ts.items()})
    return path


def assert_bit_exact(got: Tensors, want: Tensors) -> None:
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        assert (g.dtype, g.shape) == (w.dtype, w.shape), key
        assert g.tobytes() == w.tobytes(), key


# ----------------------------------------------------------------------- round trips


def test_videonsa_round_trip_is_bit_exact_and_keeps_videonsa_names(nsa_hf, tmp_path):
    out = round_trip(nsa_hf, str(tmp_path), max_shard_gb=2e-4)
    got = hf_tensors(out)
    assert_bit_exact(got, hf_tensors(nsa_hf))
    assert len(set(weight_map(out).values())) > 1  # sharded, with an index
    assert_bit_exact(read_hf(out)[1], read_hf(nsa_hf)[1])  # and read back through the index
    t = TINY.text
    assert got["model.layers.1.self_attn.g_proj_1.weight"].shape == (t.hidden_size,) * 2
    assert got["model.layers.1.self_attn.g_proj_2.weight"].shape == (
        3 * t.num_attention_heads,
        t.hidden_size,
    )
    assert got["model.layers.1.self_attn.g_proj_2.bias"].dtype == ml_dtypes.bfloat16
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(nsa_hf, "config.json")) as f:
        source = json.load(f)
    assert config["architectures"] == [VIDEONSA_ARCH]
    assert config["nsa"] == source["nsa"]


def test_transformers_loads_the_converted_directory_without_missing_or_unexpected_keys(
    plain_hf, tmp_path
):
    from transformers import Qwen2_5_VLForConditionalGeneration

    src, original = plain_hf
    out = round_trip(src, str(tmp_path), max_shard_gb=2e-4)
    assert_bit_exact(hf_tensors(out), hf_tensors(src))
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    want, got = original.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(out, name)) as f:
            assert f.read() == text


def test_tied_embeddings_convert_and_our_checkpoint_loads_with_hf_logits(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = TINY.replace(text=dataclasses.replace(TINY.text, tie_word_embeddings=True))
    src = str(tmp_path / "src")
    original = make_tiny_hf_checkpoint(src, cfg)
    assert "lm_head.weight" not in hf_tensors(src)  # tied: stored once, as the embedding
    out = round_trip(src, str(tmp_path))
    assert_bit_exact(hf_tensors(out), hf_tensors(src))
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = load_model(tmp_path / "ckpt")  # our checkpoint, not the HF directory
    assert model.cfg == cfg
    ids = np.arange(1, 12)[None]
    ref = hf_logits(original, {"input_ids": ids}, cfg)
    assert np.abs(np.asarray(model(ids)) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_newer_key_layout_reads_the_same_parameters(nsa_hf, tmp_path):
    new_dir = str(tmp_path / "new")
    shutil.copytree(nsa_hf, new_dir)
    rewrite_tensors(new_dir, lambda ts: {newer_key(k): v for k, v in ts.items()})
    assert "model.language_model.layers.0.self_attn.g_proj_1.weight" in hf_tensors(new_dir)
    cfg_old, old = read_hf(nsa_hf)
    cfg_new, new = read_hf(new_dir)
    assert cfg_new == cfg_old
    assert_bit_exact(new, old)
    # without the source's record, written back in the official (older) layout
    write_hf(str(tmp_path / "back"), cfg_new, new)
    assert_bit_exact(hf_tensors(str(tmp_path / "back")), hf_tensors(nsa_hf))


def test_nsa_config_over_a_plain_checkpoint_initialises_the_gates_as_videonsa(
    plain_hf, caplog, rng, tmp_path
):
    # the way to start fine-tuning Qwen2.5-VL into VideoNSA
    src = plain_hf[0]
    nsa = dataclasses.replace(preset("videonsa-7b-clean").nsa, block_size=4, num_selected=2)
    cfg = ModelConfig.from_hf(src).with_attention(nsa=nsa, layers=(1,))
    with caplog.at_level(logging.WARNING, logger="nsa_jax.convert.hf"):
        model = load_model(src, config=cfg)
    assert "no NSA gate tensors; initialised 4 (layers [1])" in caplog.text
    params, (_, plain) = params_of(model), read_hf(src)
    gates = {p: v for p, v in params.items() if "g_proj" in p}
    assert sorted(gates) == sorted(set(params) - set(plain))
    chex.assert_trees_all_equal({p: params[p] for p in plain}, plain)  # the rest as stored
    pre = "language.layers.1.self_attn."
    assert not gates[pre + "g_proj_1.bias"].any() and not gates[pre + "g_proj_2.bias"].any()
    for w in (gates[pre + "g_proj_1.kernel"], gates[pre + "g_proj_2.kernel"]):  # N(0, 0.02)
        err = 0.02 / np.sqrt(w.size)  # standard error of the sample mean
        assert w.dtype == np.float32 and abs(w.mean()) < 4 * err
        assert abs(w.std() - 0.02) < 4 * err / np.sqrt(2)
    # NSA reads the video rows only: the text before the first video is the plain model's
    inputs = random_prompt(rng, videos=((2, 4, 4),))
    first = int(np.argmax(inputs["input_ids"][0] == TINY.video_token_id))
    np.testing.assert_allclose(np.asarray(model(**inputs))[:, :first],
                               np.asarray(load_model(src)(**inputs))[:, :first],
                               rtol=1e-5, atol=1e-5)
    # our checkpoint of the plain model, loaded the same way, gets the same gates
    ckpt = str(tmp_path / "ckpt")
    save_checkpoint(ckpt, *read_hf(src))
    from_ckpt = params_of(load_model(ckpt, config=cfg))
    chex.assert_trees_all_equal(from_ckpt, params)


def test_a_checkpoint_with_only_some_gates_is_refused(nsa_hf, tmp_path):
    hf_dir = str(tmp_path / "hf")
    shutil.copytree(nsa_hf, hf_dir)
    key = "model.layers.0.self_attn.g_proj_1.weight"
    rewrite_tensors(hf_dir, lambda ts: {k: v for k, v in ts.items() if k != key})
    with pytest.raises(ValueError, match=f"{key!r}.* is missing"):
        read_hf(hf_dir)


def test_hf_to_jax_holds_one_copy_of_the_parameters(tmp_path):
    # many equal tensors, so "one tensor at a time" and "the whole file at once" differ
    text = dataclasses.replace(
        TINY.text,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        mrope_section=(8, 12, 12),
    )
    cfg = TINY.replace(text=text, vision=dataclasses.replace(TINY.vision, out_hidden_size=256))
    rng = np.random.default_rng(0)
    shapes = names.our_param_shapes(cfg)
    write_hf(
        str(tmp_path / "hf"), cfg, {p: rng.random(s, np.float32) for p, (s, _) in shapes.items()}
    )
    total = sum(4 * int(np.prod(s)) for s, _ in shapes.values())
    largest = max(4 * int(np.prod(s)) for s, _ in shapes.values())
    tracemalloc.start()
    try:
        _, params = read_hf(str(tmp_path / "hf"))
        assert tracemalloc.get_traced_memory()[1] <= total + 2 * largest
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
        assert tracemalloc.get_traced_memory()[1] - held <= 2 * largest
    finally:
        tracemalloc.stop()


# a fresh process converts through the command line; it reports its RSS once everything is
# imported and its peak RSS after the conversion. The peak is the kernel's VmHWM of this
# process image: ru_maxrss would not do, since Linux carries it over an exec from the forked
# copy of the parent (pytest, which may be larger than the whole conversion)
PEAK_RSS_SCRIPT = """
import json, sys
import jax.numpy, orbax.checkpoint, safetensors
from nsa_jax import cli
from nsa_jax.convert import checkpoint, hf
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
before = status_kib("VmRSS")
rc = cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "before_kib": before, "peak_kib": status_kib("VmHWM")}))
"""


def conversion_peak_bytes(*argv: str) -> int:
    """Peak RSS of `nsa-jax convert ARGV` in a new process, above its RSS after imports."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root)
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_SCRIPT, "convert", *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    report = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert report, run.stderr[-2000:]
    m = json.loads(report[-1])
    assert m["rc"] == 0, run.stderr[-2000:]
    return 1024 * (m["peak_kib"] - m["before_kib"])


def test_both_directions_stream_one_tensor_at_a_time(tmp_path):
    # 16 layers, 245 MiB of f32 parameters whose largest tensor is 4 MiB: holding the model
    # would add at least 245 MiB to the peak; streaming adds a few tensors and the buffers of
    # the writers (40-90 MiB measured)
    text = dataclasses.replace(
        TINY.text,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=4,
        mrope_section=(16, 24, 24),
    )
    cfg = TINY.replace(text=text, vision=dataclasses.replace(TINY.vision, out_hidden_size=512))
    shapes = names.our_param_shapes(cfg)
    total = sum(4 * int(np.prod(s)) for s, _ in shapes.values())
    largest = max(4 * int(np.prod(s)) for s, _ in shapes.values())
    assert total > 240 * 2**20 and largest == 4 * 2**20

    def random_tensor(i: int, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        return lambda: np.random.default_rng(i).random(shape, np.float32)

    lazy = {
        p: LazyArray(s, np.dtype(np.float32), random_tensor(i, s))
        for i, (p, (s, _)) in enumerate(shapes.items())
    }
    src, ckpt, out = (str(tmp_path / d) for d in ("hf", "ckpt", "hf_out"))
    write_hf(src, cfg, lazy, max_shard_bytes=64 * 2**20)
    to_jax = conversion_peak_bytes("hf-to-jax", "--hf", src, "--out", ckpt)
    to_hf = conversion_peak_bytes("jax-to-hf", "--ckpt", ckpt, "--out", out, "--max-shard-gb", "1")
    assert to_jax < total / 2, (to_jax / 2**20, total / 2**20)
    assert to_hf < total / 2, (to_hf / 2**20, total / 2**20)
    # and the result is the model written: spot-check the largest and the last tensors
    got, want = hf_tensors(out), hf_tensors(src)
    for key in ("model.layers.15.mlp.down_proj.weight", "model.norm.weight"):
        assert got[key].tobytes() == want[key].tobytes(), key


def test_parameter_paths_are_the_same_for_shapes_params_and_loading():
    cfg = TINY.with_attention(nsa=preset("videonsa-7b-clean").nsa)
    model = init_model(cfg, seed=2)
    params = params_of(model)
    shapes = names.our_param_shapes(cfg)
    assert sorted(params) == sorted(shapes)
    assert all(params[p].shape == shape for p, (shape, _) in shapes.items())
    assert "language.layers.1.self_attn.g_proj_2.kernel" in params
    reloaded = params_of(model_from_params(cfg, params))
    chex.assert_trees_all_equal(reloaded, params)


def test_convert_help_explains_both_directions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    text = capsys.readouterr().out
    for phrase in (
        "hf-to-jax",
        "jax-to-hf",
        "--hf DIR --out CKPT [--preset NAME]",
        "--ckpt CKPT --out DIR [--max-shard-gb GB]",
        "DonerightForConditionalGeneration",
        "block_counts / window_size",
        "hf_source/",
        "an empty or\ntruncated shard",
    ):
        assert phrase in text
    with pytest.raises(SystemExit):
        cli.main(["convert", "hf-to-jax", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "config.json's): " + ", ".join(sorted(config_module.PRESETS)) in text


# ----------------------------------------------------------------------- atomic writes


class DiskFull(OSError):
    pass


def _fail_at_the_second_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = hf_module.write_safetensors, []

    def write_then_fail(*args, **kwargs) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise DiskFull("no space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(hf_module, "write_safetensors", write_then_fail)


def _fail_after_config_and_params(monkeypatch: pytest.MonkeyPatch) -> None:
    def copy_then_fail(*args, **kwargs) -> None:
        raise DiskFull("no space left on device")

    monkeypatch.setattr(checkpoint_module, "copy_extra_files", copy_then_fail)


WRITERS = {
    "write_hf": lambda out, cfg, params, src: write_hf(
        out, cfg, params, max_shard_bytes=20_000, extra_dir=src
    ),
    "save_checkpoint": lambda out, cfg, params, src: save_checkpoint(
        out, cfg, params, extra_from=src
    ),
}


@pytest.mark.parametrize(
    "writer,fail",
    [("write_hf", _fail_at_the_second_shard), ("save_checkpoint", _fail_after_config_and_params)],
)
def test_a_write_that_fails_midway_leaves_no_output_and_no_temporary_directory(
    plain_hf, tmp_path, monkeypatch, writer, fail
):
    src = plain_hf[0]
    cfg, params = read_hf(src)
    parent = tmp_path / "parent"
    parent.mkdir()
    with monkeypatch.context() as m:
        fail(m)
        with pytest.raises(DiskFull):
            WRITERS[writer](str(parent / "out"), cfg, params, src)
    assert os.listdir(parent) == []
    WRITERS[writer](str(parent / "out"), cfg, params, src)  # the same call, undisturbed
    assert os.listdir(parent) == ["out"]
    assert "config.json" in os.listdir(parent / "out")


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writers_refuse_a_non_empty_directory_and_fill_an_empty_one(plain_hf, tmp_path, writer):
    cfg, params = read_hf(plain_hf[0])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        WRITERS[writer](str(tmp_path / "full"), cfg, params, None)
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    WRITERS[writer](str(tmp_path / "empty"), cfg, params, None)
    assert "config.json" in os.listdir(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path)) == ["empty", "full"]


# ----------------------------------------------------------------------- bad input


# Each damage returns the file the message must name and the tensors it may name (any one).


def _drop_shard(hf_dir: str) -> tuple[str, list[str]]:
    cfg, params = read_hf(hf_dir)
    shutil.rmtree(hf_dir)
    write_hf(hf_dir, cfg, params, max_shard_bytes=20_000)
    with open(os.path.join(hf_dir, INDEX)) as f:
        wm = json.load(f)["weight_map"]
    shard = wm[sorted(wm)[len(wm) // 2]]
    os.remove(os.path.join(hf_dir, shard))
    return shard, [k for k, file in wm.items() if file == shard]


def _misshape(hf_dir: str) -> tuple[str, list[str]]:
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensors(hf_dir, lambda ts: {**ts, key: ts[key][:-1]})
    return "model.safetensors", [key]


def _drop_tensor(hf_dir: str) -> tuple[str, list[str]]:
    key = "visual.blocks.1.attn.qkv.bias"
    rewrite_tensors(hf_dir, lambda ts: {k: v for k, v in ts.items() if k != key})
    return hf_dir, [key]


def _extra_tensor(hf_dir: str) -> tuple[str, list[str]]:
    key = "model.layers.0.self_attn.q_norm.weight"
    rewrite_tensors(hf_dir, lambda ts: {**ts, key: np.ones(4, np.float32)})
    return "model.safetensors", [key]


def _unknown_architecture(hf_dir: str) -> tuple[str, list[str]]:
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["architectures"] = ["LlavaForConditionalGeneration"]
    with open(path, "w") as f:
        json.dump(config, f)
    return "config.json", ["LlavaForConditionalGeneration"]


@pytest.mark.parametrize(
    "damage", [_drop_shard, _misshape, _drop_tensor, _extra_tensor, _unknown_architecture]
)
def test_bad_checkpoint_fails_naming_the_file_and_the_tensor(plain_hf, tmp_path, damage):
    hf_dir = str(tmp_path / "hf")
    shutil.copytree(plain_hf[0], hf_dir)
    file, tensors = damage(hf_dir)
    with pytest.raises(ValueError) as err:
        read_hf(hf_dir)
    assert file in str(err.value)
    assert any(repr(t) in str(err.value) for t in tensors)


def test_command_line_reports_a_bad_checkpoint_and_exits_nonzero(plain_hf, tmp_path, capsys):
    hf_dir = str(tmp_path / "hf")
    shutil.copytree(plain_hf[0], hf_dir)
    file, [key] = _misshape(hf_dir)
    assert convert("hf-to-jax", "--hf", hf_dir, "--out", str(tmp_path / "ckpt")) == 1
    err = capsys.readouterr().err
    assert "nsa-jax convert: error:" in err and file in err and key in err


def test_conversion_refuses_to_overwrite(plain_hf, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    assert convert("hf-to-jax", "--hf", plain_hf[0], "--out", str(tmp_path / "ckpt")) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------- our checkpoints


@pytest.mark.parametrize("damage", ["extra", "misshapen"])
def test_our_checkpoint_with_an_unexpected_or_misshapen_parameter_is_refused(tmp_path, damage):
    cfg = TINY.with_attention(nsa=preset("videonsa-7b-clean").nsa)
    params = params_of(init_model(cfg))
    if damage == "extra":
        params["language.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)
        message = (
            r"unexpected parameter 'language\.layers\.0\.self_attn\.q_norm\.weight' "
            r"\(1 unexpected in all\)"
        )
    else:
        params["language.layers.1.mlp.up_proj.kernel"] = params[
            "language.layers.1.mlp.up_proj.kernel"
        ][:, :-1]
        message = (
            r"parameter 'language\.layers\.1\.mlp\.up_proj\.kernel' has shape \[64, 127\], "
            r"the model expects \[64, 128\]"
        )
    save_checkpoint(str(tmp_path / "ckpt"), cfg, params)
    with pytest.raises(hf_module.CheckpointError, match=message):
        load_model(tmp_path / "ckpt")


def test_the_nsa_backend_is_not_part_of_the_saved_config():
    cfg = TINY.with_attention(nsa=preset("videonsa-7b-clean").nsa, implementation="reference")
    d = cfg.to_hf()
    assert "nsa_implementation" not in d["nsa"]
    assert ModelConfig.from_hf(d) == cfg.with_attention(implementation="auto")
    # a config.json written before still loads, its stored backend left out
    d["nsa"]["nsa_implementation"] = "pallas_gpu"
    assert ModelConfig.from_hf(d).attention.implementation == "auto"


# ----------------------------------------------------------------------- as published


def published_files(hf_dir: str) -> dict[str, bytes]:
    """`{file name: bytes}` of the model files of an HF directory (config, index, shards),
    shards as `{key: tensor bytes}` so that only the header's byte order may differ."""
    out: dict[str, object] = {}
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if name.endswith(".safetensors"):
            out[name] = {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in load_file(path).items()}
        elif name in ("config.json", INDEX):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


@pytest.mark.parametrize(
    "architecture,layout,shards",
    [
        ("DonerightForConditionalGeneration", "old", 2),
        (VIDEONSA_ARCH, "new", 2),
        ("Qwen2_5_VLForConditionalGeneration", "new", 1),
    ],
)
def test_published_videonsa_round_trips_as_published(
    tmp_path, caplog, architecture, layout, shards
):
    src = str(tmp_path / "src")
    make_published_videonsa(
        src, architecture=architecture, layout=layout, shards=shards, dtype=ml_dtypes.bfloat16
    )
    with caplog.at_level(logging.WARNING, logger="nsa_jax.convert.hf"):
        out = round_trip(src, str(tmp_path), max_shard_gb=None)
    qwen = architecture == "Qwen2_5_VLForConditionalGeneration"
    warned = [r.getMessage() for r in caplog.records if "VideoNSA's gates" in r.getMessage()]
    assert len(warned) == int(qwen)  # one line, only where config.json does not say NSA
    assert not [r for r in caplog.records if "Skipping merge of OCDBT" in r.getMessage()]
    if qwen:
        assert "declares Qwen2_5_VLForConditionalGeneration" in warned[0]
        assert "in 2 of 2 layers: loading with NSA on" in warned[0]
    cfg = ModelConfig.from_hf(str(tmp_path / "ckpt"))
    assert cfg.nsa == dataclasses.replace(preset("videonsa-7b").nsa)
    assert cfg.attention.layers is None
    assert cfg.rope_index_style == "qwen"
    assert published_files(out) == published_files(src)  # names, keys, bytes, config, index
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))


def test_gates_keep_videonsa_head_major_order(tmp_path, rng):
    src = str(tmp_path / "src")
    tensors = make_published_videonsa(src, layout="new")
    model = load_model(src)
    t = TINY.text
    x = rng.standard_normal((1, 5, t.hidden_size)).astype(np.float32)
    attn = model.language.layers[1].self_attn
    ours = np.asarray(attn.g_proj_2(jax.nn.gelu(attn.g_proj_1(x), approximate=False)))
    pre = "model.language_model.layers.1.self_attn."
    w1, b1, w2, b2 = (
        torch.as_tensor(tensors[pre + n])
        for n in ("g_proj_1.weight", "g_proj_1.bias", "g_proj_2.weight", "g_proj_2.bias")
    )
    # VideoNSA: g_proj_2(gelu(g_proj_1(x))).view(B, T, heads, 3), branch order (cmp, slc, swa)
    h = torch.nn.functional.gelu(torch.as_tensor(x) @ w1.T + b1)
    theirs = (h @ w2.T + b2).view(1, 5, t.num_attention_heads, 3).numpy()
    np.testing.assert_allclose(
        ours.reshape(1, 5, t.num_attention_heads, 3), theirs, rtol=1e-5, atol=1e-6
    )
    # column head*3 + branch of our kernel is row head*3 + branch of theirs
    kernel = np.asarray(attn.g_proj_2.kernel[...])
    assert np.array_equal(kernel[:, 2 * 3 + 1], tensors[pre + "g_proj_2.weight"][2 * 3 + 1])


def test_block_counts_and_window_size_are_read_and_written_back(tmp_path):
    src = str(tmp_path / "src")
    make_published_videonsa(src, config_extra={"block_counts": 16, "window_size": 128})
    out = round_trip(src, str(tmp_path), max_shard_gb=None)
    cfg = ModelConfig.from_hf(str(tmp_path / "ckpt"))
    assert (cfg.nsa.num_selected, cfg.nsa.window) == (16, 128)
    assert published_files(out) == published_files(src)
    # resharded on request: other files, the same keys, bytes and config.json
    resharded = str(tmp_path / "resharded")
    ckpt = str(tmp_path / "ckpt")
    assert convert("jax-to-hf", "--ckpt", ckpt, "--out", resharded, "--max-shard-gb", "2e-4") == 0
    assert len(set(weight_map(resharded).values())) > 2
    assert_bit_exact(hf_tensors(resharded), hf_tensors(src))
    with (
        open(os.path.join(src, "config.json")) as a,
        open(os.path.join(resharded, "config.json")) as b,
    ):
        assert a.read() == b.read()
    # our own config.json writes them beside the "nsa" key, for VideoNSA's code to read
    d = preset("videonsa-7b-clean").to_hf()
    assert (d["block_counts"], d["window_size"]) == (32, 256)
    d["nsa"]["window"] = 512
    with pytest.raises(ValueError, match="window_size 256 disagrees with nsa.window 512"):
        ModelConfig.from_hf(d)


def test_a_preset_sets_nsa_and_the_config_is_merged_on_the_way_out(tmp_path, monkeypatch, capsys):
    src = str(tmp_path / "src")
    make_published_videonsa(src, layout="new", shards=1)
    clean = TINY.with_attention(
        nsa=dataclasses.replace(preset("videonsa-7b-clean").nsa, num_selected=4, window=8),
    ).replace(rope_index_style="qwen")
    monkeypatch.setitem(config_module.PRESETS, "tiny-videonsa", clean)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert convert("hf-to-jax", "--hf", src, "--out", ckpt, "--preset", "tiny-videonsa") == 0
    assert ModelConfig.from_hf(ckpt) == clean
    assert convert("jax-to-hf", "--ckpt", ckpt, "--out", out) == 0
    with open(os.path.join(src, "config.json")) as f:
        before = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        after = json.load(f)
    assert ModelConfig.from_hf(after) == clean
    assert (
        "text_config" in after and after["transformers_version"] == before["transformers_version"]
    )
    assert after["text_config"]["hidden_size"] == before["text_config"]["hidden_size"]
    assert after["architectures"] == before["architectures"]  # it declared NSA already
    assert (after["block_counts"], after["window_size"]) == (4, 8)
    files = published_files(out)
    assert files["model.safetensors"] == published_files(src)["model.safetensors"]
    # a preset of another model is refused, naming the field
    assert (
        convert("hf-to-jax", "--hf", src, "--out", str(tmp_path / "c2"), "--preset", "videonsa-7b")
        == 1
    )
    err = capsys.readouterr().err
    assert "config.json: text vocab_size is 1000, preset 'videonsa-7b' has 152064" in err
    assert not os.path.exists(tmp_path / "c2")


# ----------------------------------------------------------------------- checks before writing


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsa-jax convert: error: ") and "\n" not in err, err  # no traceback
    return err


def _edit_config(ckpt: str, **changes: int) -> None:
    path = os.path.join(ckpt, "config.json")
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


@pytest.fixture(scope="module")
def our_ckpt(plain_hf, tmp_path_factory) -> str:
    """Our checkpoint of the plain tiny model, converted from HF."""
    path = str(tmp_path_factory.mktemp("ours") / "ckpt")
    assert convert("hf-to-jax", "--hf", plain_hf[0], "--out", path) == 0
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"intermediate_size": 130},
            r"params: parameter 'language\.layers\.0\.mlp\.down_proj\.kernel' has shape "
            r"\[128, 64\], .*config\.json implies \[130, 64\]",
        ),
        (
            {"num_hidden_layers": 3},
            r"params: 57 parameters where .*config\.json \(num_hidden_layers 3, .*\) describes "
            r"69: parameter 'language\.layers\.2\..*' is missing \(12 missing, 0 unexpected",
        ),
        (
            {"num_hidden_layers": 1},
            r"params: 57 parameters where .*describes 45: parameter 'language\.layers\.1\..*' "
            r"is unexpected \(0 missing, 12 unexpected",
        ),
    ],
)
def test_jax_to_hf_checks_every_tensor_against_the_config_before_writing(
    our_ckpt, tmp_path, capsys, change, message
):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(our_ckpt, ckpt)
    _edit_config(ckpt, **change)
    assert convert("jax-to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "hf")) == 1
    assert re.search(message, _one_line_error(capsys))
    assert os.listdir(tmp_path) == ["ckpt"]  # nothing written, no temporary left


def _truncate(hf_dir: str) -> tuple[str, str]:
    path = os.path.join(hf_dir, "model-00001-of-00002.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return path, "truncated: its tensors need"


def _zero_bytes(hf_dir: str) -> tuple[str, str]:
    path = os.path.join(hf_dir, "model-00002-of-00002.safetensors")
    open(path, "w").close()
    return path, r"the file is empty \(0 bytes\)"


def _no_index(hf_dir: str) -> tuple[str, str]:
    path = os.path.join(hf_dir, INDEX)
    os.remove(path)
    return path, "missing: .* has 2 shard\\(s\\) \\(model-00001-of-00002.safetensors, ...\\)"


def _damaged_header(hf_dir: str) -> tuple[str, str]:
    path = os.path.join(hf_dir, "model-00002-of-00002.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"}")
    return path, "damaged: the header is not valid JSON"


def _no_config(hf_dir: str) -> tuple[str, str]:
    path = os.path.join(hf_dir, "config.json")
    os.remove(path)
    return path, "missing; a model directory holds its config.json"


def _a_file(hf_dir: str) -> tuple[str, str]:
    path = os.path.join(hf_dir, "config.json")
    return path, "a file, not a directory; give the Hugging Face model directory"


@pytest.mark.parametrize(
    "damage", [_truncate, _zero_bytes, _no_index, _damaged_header, _no_config, _a_file]
)
def test_hf_to_jax_names_a_damaged_or_missing_file_in_one_line(tmp_path, capsys, damage):
    src = str(tmp_path / "src")
    make_published_videonsa(src)
    path, message = damage(src)
    capsys.readouterr()  # transformers' progress bars
    given = path if damage is _a_file else src
    assert convert("hf-to-jax", "--hf", given, "--out", str(tmp_path / "ckpt")) == 1
    err = _one_line_error(capsys)
    assert f"error: {path}: " in err and re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_jax_to_hf_names_a_checkpoint_without_params_in_one_line(our_ckpt, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(our_ckpt, ckpt)
    shutil.rmtree(os.path.join(ckpt, "params"))
    assert convert("jax-to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "hf")) == 1
    err = _one_line_error(capsys)
    assert f"error: --ckpt {ckpt}: not a run, step, exported model or HF directory" in err
    assert "params/ (nsa-jax export)" in err
    assert os.listdir(tmp_path) == ["ckpt"]


@pytest.mark.parametrize("same", [True, False])
def test_a_tied_head_stored_beside_the_embedding_is_written_back_only_if_equal(
    tmp_path, capsys, same
):
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, tie_word_embeddings=True))
    src = str(tmp_path / "src")
    make_tiny_hf_checkpoint(src, cfg)
    embedding = hf_tensors(src)["model.embed_tokens.weight"]
    rewrite_tensors(src, lambda ts: {**ts, "lm_head.weight": embedding + (0 if same else 1)})
    capsys.readouterr()
    if same:
        out = round_trip(src, str(tmp_path), max_shard_gb=None)
        assert published_files(out) == published_files(src)
    else:
        ckpt = str(tmp_path / "ckpt")
        assert convert("hf-to-jax", "--hf", src, "--out", ckpt) == 1
        err = _one_line_error(capsys)
        assert "model.safetensors: tensor 'lm_head.weight' differs from" in err
        assert "'model.embed_tokens.weight' although tie_word_embeddings is true" in err
        assert sorted(os.listdir(tmp_path)) == ["src"]


def test_nsa_added_by_a_preset_is_written_in_the_source_key_layout_and_config(
    tmp_path, monkeypatch, caplog
):
    # Qwen2.5-VL in the newer key layout, made VideoNSA by a preset: the gates are new, so the
    # files are ours, but keys keep the source's layout and config.json keeps its own keys
    src = str(tmp_path / "src")
    make_tiny_hf_checkpoint(src)
    rewrite_tensors(src, lambda ts: {newer_key(k): v for k, v in ts.items()})
    clean = TINY.with_attention(nsa=dataclasses.replace(preset("videonsa-7b-clean").nsa, window=8))
    monkeypatch.setitem(config_module.PRESETS, "tiny-videonsa", clean)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    with caplog.at_level(logging.WARNING, logger="nsa_jax.convert.hf"):
        assert convert("hf-to-jax", "--hf", src, "--out", ckpt, "--preset", "tiny-videonsa") == 0
    assert "has no NSA gate tensors; initialised 8 (layers [0, 1])" in caplog.text
    assert convert("jax-to-hf", "--ckpt", ckpt, "--out", out) == 0
    assert sorted(os.listdir(out)) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00001.safetensors",
        INDEX,
    ]
    got, want = hf_tensors(out), hf_tensors(src)
    gates = {k for k in got if ".g_proj_" in k}
    assert sorted(set(got) - gates) == sorted(want)
    assert "model.language_model.layers.1.self_attn.g_proj_2.bias" in gates and len(gates) == 8
    assert all(got[k].tobytes() == v.tobytes() for k, v in want.items())
    with open(os.path.join(out, "config.json")) as f:
        after = json.load(f)
    assert ModelConfig.from_hf(after) == clean
    assert after["architectures"] == [VIDEONSA_ARCH] and "text_config" in after
    hf_config = Qwen2_5_VLConfig.from_pretrained(out)  # still a valid Qwen2.5-VL config
    assert hf_config.text_config.num_hidden_layers == TINY.text.num_hidden_layers
    assert (after["block_counts"], after["window_size"]) == (32, 8)


def test_a_qwen_config_with_gates_on_some_layers_turns_nsa_on_there():
    d = TINY.to_hf()
    assert ModelConfig.from_hf(d).nsa is None
    cfg = ModelConfig.from_hf(d, gated_layers=(1,))
    assert cfg.nsa == preset("videonsa-7b").nsa and cfg.attention.layers == (1,)
    assert ModelConfig.from_hf(d, gated_layers=(0, 1)).attention.layers is None  # all of them
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_jax_to_hf_names_a_damaged_parameter_file_in_one_line(our_ckpt, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(our_ckpt, ckpt)
    name = "visual.blocks.0.attn.qkv.kernel"
    [chunk] = [f for f in os.listdir(os.path.join(ckpt, "params", name)) if f[0] != "."]
    with open(os.path.join(ckpt, "params", name, chunk), "r+b") as f:
        f.truncate(100)
    assert convert("jax-to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "hf")) == 1
    err = _one_line_error(capsys)
    assert f"error: {ckpt}/params: parameter {name!r} does not restore (" in err
    assert "Truncated" in err
    assert os.listdir(tmp_path) == ["ckpt"]  # the partial output removed
