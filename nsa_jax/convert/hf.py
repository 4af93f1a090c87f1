"""Hugging Face checkpoint directories <-> our flat parameter dicts.

Reading is lazy, tensor by tensor (`safe_open`), so a 7B model converts within the memory of
a 24 GiB machine: only the output dict (the model's own size) is held. Writing splits tensors
into `model-0000i-of-0000N.safetensors` shards with a `model.safetensors.index.json`, the
layout of the official Qwen2.5-VL checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nsa_jax.config import ModelConfig
from nsa_jax.convert import names

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


log = logging.getLogger(__name__)

GATE_INIT_STD = 0.02  # VideoNSA's gate init: N(0, 0.02) weights, zero biases (gates start at 0.5)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor."""


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a new temporary sibling of `path` to write into, renamed to `path` when the block
    ends and removed when it raises: a failed or killed write never leaves a half-written
    `path` that would later read as a checkpoint.

    `path` must not exist or be an empty directory (replaced by the rename). A process killed
    mid-write leaves only the hidden `.NAME.tmp-*` sibling.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path} already exists and is not an empty directory")
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)  # not mkdtemp: its 0700 mode would stay on the checkpoint
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weight_map(hf_dir: str) -> dict[str, str]:
    """`{tensor key: shard file path}` from the index (or the single `model.safetensors`).

    Raises `CheckpointError` naming the shard when a file the index lists is missing.
    """
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        out = {}
        for key, shard in wm.items():
            path = os.path.join(hf_dir, shard)
            if not os.path.exists(path):
                raise CheckpointError(
                    f"{index}: shard {shard} (holding tensor {key!r}) is missing from {hf_dir}"
                )
            out[key] = path
        return out
    single = os.path.join(hf_dir, SINGLE)
    if not os.path.exists(single):
        raise CheckpointError(f"{hf_dir}: neither {INDEX} nor {SINGLE} found")
    with safe_open(single, framework="np") as f:
        return dict.fromkeys(f.keys(), single)  # noqa: SIM118 (safe_open is not a dict)


def read_hf(
    hf_dir: str,
    cfg: ModelConfig | None = None,
    *,
    on_tensor: Callable[[str, np.ndarray], None] | None = None,
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Reads an HF Qwen2.5-VL / VideoNSA directory into `(cfg, {our_path: array})`.

    Arrays keep their stored dtype (bf16 stays bf16: the round trip is bit-exact). Accepts
    both key layouts. Raises `CheckpointError` for a missing shard, a missing tensor, a shape
    mismatch or an unexpected tensor, naming the file and the tensor.

    A `cfg` with NSA layers over a checkpoint without any gate tensors (plain Qwen2.5-VL, to be
    fine-tuned into VideoNSA) gets the gates initialised as VideoNSA does, N(0, 0.02) weights
    and zero biases, in the checkpoint's dtype, and a warning says so. A checkpoint with only
    some of the gates the config needs is an error.
    """
    cfg = cfg or ModelConfig.from_hf(hf_dir)
    wm = weight_map(hf_dir)
    shapes = names.our_param_shapes(cfg)
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}
    by_file: dict[str, list[tuple[str, str, str, tuple[int, ...]]]] = {}
    missing: list[str] = []
    for path, (shape, _) in shapes.items():
        for key, kind in names.hf_candidates(path):
            if key in wm:
                by_file.setdefault(wm[key], []).append((path, key, kind, shape))
                used.add(key)
                break
        else:
            missing.append(path)
    check_missing(missing, shapes, hf_dir)
    unexpected = set(wm) - used - names.ignorable_hf_keys(wm, cfg)
    if unexpected:
        key = sorted(unexpected)[0]
        raise CheckpointError(
            f"{wm[key]}: unexpected tensor {key!r} ({len(unexpected)} unexpected in all) for "
            f"architecture {cfg.architecture} with this config"
        )
    for file, items in by_file.items():
        with safe_open(file, framework="np") as f:
            for path, key, kind, shape in items:
                stored = tuple(f.get_slice(key).get_shape())
                want = names.hf_shape(shape, kind, cfg)
                if stored != want:
                    raise CheckpointError(
                        f"{file}: tensor {key!r} has shape {list(stored)}, expected {list(want)} "
                        "from config.json"
                    )
                arr = names.from_hf_array(f.get_tensor(key), kind)
                out[path] = arr
                if on_tensor is not None:
                    on_tensor(path, arr)
    init_gates(out, missing, shapes, hf_dir)
    return cfg, out


def check_missing(
    missing: list[str], shapes: dict[str, tuple[tuple[int, ...], str]], where: str
) -> None:
    """Raises `CheckpointError` unless the parameters `missing` from the checkpoint at `where`
    are none or all of the NSA gates (which `init_gates` then creates)."""
    n_gates = sum(names.is_gate(p) for p in shapes)
    if any(not names.is_gate(p) for p in missing) or 0 < len(missing) < n_gates:
        path = next((p for p in missing if not names.is_gate(p)), missing[0])
        old, _ = names.hf_name(path, layout="old")
        raise CheckpointError(
            f"{where}: tensor {old!r} (or its newer-layout name) is missing from the "
            f"checkpoint; needed for {path}"
        )


def init_gates(
    params: dict[str, np.ndarray],
    gates: list[str],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    where: str,
) -> None:
    """Adds the gate parameters `gates` to `params`, initialised as VideoNSA does, in the
    dtype of the stored embedding; each seeded by its path, so a load is reproducible."""
    if not gates:
        return
    dtype = params["language.embed_tokens.embedding"].dtype
    for path in gates:
        shape = shapes[path][0]
        if path.endswith(".bias"):
            params[path] = np.zeros(shape, dtype)
        else:
            rng = np.random.default_rng(zlib.crc32(path.encode()))
            params[path] = (GATE_INIT_STD * rng.standard_normal(shape, np.float32)).astype(dtype)
    log.warning(
        "%s has no NSA gate tensors; initialised %d (layers %s) as VideoNSA does: "
        "N(0, %s) weights, zero biases",
        where,
        len(gates),
        sorted({int(p.split(".")[2]) for p in gates}),
        GATE_INIT_STD,
    )


def write_hf(
    out_dir: str,
    cfg: ModelConfig,
    params: dict[str, np.ndarray],
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_dir: str | None = None,
) -> list[str]:
    """Writes `params` (our flat dict) as the new HF checkpoint directory `out_dir` (absent or
    empty); returns the shard files.

    Also writes `config.json` and copies tokenizer/processor files from `extra_dir` if given.
    Atomic: everything is written to a temporary sibling renamed to `out_dir` at the end.
    """
    shapes = names.our_param_shapes(cfg)
    missing = set(shapes) - set(params)
    if missing:
        raise CheckpointError(
            f"parameters missing for {sorted(missing)[0]!r} ({len(missing)} in all)"
        )
    with atomic_directory(out_dir) as tmp:
        return _write_hf_files(tmp, cfg, params, max_shard_bytes, extra_dir)


def _write_hf_files(
    out_dir: str,
    cfg: ModelConfig,
    params: dict[str, np.ndarray],
    max_shard_bytes: int,
    extra_dir: str | None,
) -> list[str]:
    entries = []
    for path in sorted(params):
        key, kind = names.hf_name(path, layout="old")
        want = names.hf_shape(tuple(params[path].shape), kind, cfg)
        entries.append((key, path, kind, want, params[path].nbytes))
    entries.sort(key=lambda e: e[0])
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[4]
    n = len(shards)
    files, wm = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {
            key: names.to_hf_array(params[path], kind, want) for key, path, kind, want, _ in shard
        }
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        files.append(fname)
        wm.update({e[0]: fname for e in shard})
    total = sum(e[4] for e in entries)
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
    dtypes = {str(np.asarray(params[p]).dtype) for p in params}
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = "bfloat16" if "bfloat16" in dtypes else "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if extra_dir is not None:
        copy_extra_files(extra_dir, out_dir)
    return files


def copy_extra_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer/processor/generation files present in `src` to `dst`."""
    copied = []
    os.makedirs(dst, exist_ok=True)
    for name in EXTRA_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
