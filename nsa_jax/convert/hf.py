"""Hugging Face checkpoint directories <-> our flat parameter dicts.

Both directions stream: `lazy_hf` checks a directory from the shards' headers and hands back
one `LazyArray` per tensor (read with `safe_open` when loaded), and `write_hf` writes each
shard tensor by tensor, loading each lazy value only when its bytes are due. A conversion
therefore holds about one tensor at a time, whatever the model's size. Shards are named
`model-0000i-of-0000N.safetensors` with a `model.safetensors.index.json`, the layout of the
official Qwen2.5-VL checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

from nsa_jax.config import ModelConfig
from nsa_jax.convert import names
from nsa_jax.convert.lazy import LazyArray, materialize

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

# safetensors dtype names <-> NumPy dtypes (bf16 through ml_dtypes)
FROM_SAFETENSORS_DTYPE: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
TO_SAFETENSORS_DTYPE: dict[np.dtype, str] = {v: k for k, v in FROM_SAFETENSORS_DTYPE.items()}

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


def lazy_hf(
    hf_dir: str, cfg: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, LazyArray]]:
    """Checks an HF Qwen2.5-VL / VideoNSA directory and returns `(cfg, {our_path: LazyArray})`,
    each tensor read from its shard (and put in our layout) only when loaded.

    Only the shards' headers are read here. Arrays keep their stored dtype (bf16 stays bf16:
    the round trip is bit-exact). Accepts both key layouts. Raises `CheckpointError` for a
    missing shard, a missing tensor, a shape mismatch or an unexpected tensor, naming the file
    and the tensor.

    A `cfg` with NSA layers over a checkpoint without any gate tensors (plain Qwen2.5-VL, to be
    fine-tuned into VideoNSA) gets the gates initialised as VideoNSA does, N(0, 0.02) weights
    and zero biases, in the dtype of the stored embedding, and a warning says so. A checkpoint
    with only some of the gates the config needs is an error.
    """
    cfg = cfg or ModelConfig.from_hf(hf_dir)
    wm = weight_map(hf_dir)
    shapes = names.our_param_shapes(cfg)
    used: set[str] = set()
    found: dict[str, tuple[str, str]] = {}
    missing: list[str] = []
    for path in shapes:
        for key, kind in names.hf_candidates(path):
            if key in wm:
                found[path] = (key, kind)
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
    headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    out: dict[str, LazyArray] = {}
    for path, (key, kind) in found.items():
        file = wm[key]
        if file not in headers:
            headers[file] = safetensors_header(file)
        stored, dtype = headers[file][key]
        want = names.hf_shape(shapes[path][0], kind, cfg)
        if stored != want:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {list(stored)}, expected {list(want)} "
                "from config.json"
            )
        out[path] = LazyArray(shapes[path][0], np.dtype(dtype), read_tensor(file, key, kind))
    if missing:
        dtype = out["language.embed_tokens.embedding"].dtype
        for path in missing:
            out[path] = LazyArray(
                shapes[path][0], dtype, functools.partial(gate_array, path, shapes[path][0], dtype)
            )
        warn_gates(hf_dir, missing)
    return cfg, out


def read_tensor(file: str, key: str, kind: str) -> Callable[[], np.ndarray]:
    """A loader of one tensor in our layout: opens the shard, reads the tensor, closes."""

    def load() -> np.ndarray:
        with safe_open(file, framework="np") as f:
            return names.from_hf_array(f.get_tensor(key), kind)

    return load


def safetensors_header(file: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{key: (shape, numpy dtype name)}` of a safetensors file, from its header alone."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in FROM_SAFETENSORS_DTYPE:
            raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        out[key] = (tuple(entry["shape"]), FROM_SAFETENSORS_DTYPE[entry["dtype"]])
    return out


def read_hf(
    hf_dir: str, cfg: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """`lazy_hf` with every tensor loaded: `(cfg, {our_path: array})`."""
    cfg, lazy = lazy_hf(hf_dir, cfg)
    return cfg, {path: x.load() for path, x in lazy.items()}


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


def gate_array(path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A gate parameter initialised as VideoNSA does (N(0, 0.02) weights, zero biases), seeded
    by its path so a load is reproducible."""
    if path.endswith(".bias"):
        return np.zeros(shape, dtype)
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    return (GATE_INIT_STD * rng.standard_normal(shape, np.float32)).astype(dtype)


def warn_gates(where: str, gates: list[str]) -> None:
    log.warning(
        "%s has no NSA gate tensors; initialised %d (layers %s) as VideoNSA does: "
        "N(0, %s) weights, zero biases",
        where,
        len(gates),
        sorted({int(p.split(".")[2]) for p in gates}),
        GATE_INIT_STD,
    )


def init_gates(
    params: dict[str, np.ndarray],
    gates: list[str],
    shapes: dict[str, tuple[tuple[int, ...], str]],
    where: str,
) -> None:
    """Adds the gate parameters `gates` to `params`, initialised by `gate_array` in the dtype
    of the stored embedding."""
    if not gates:
        return
    dtype = params["language.embed_tokens.embedding"].dtype
    for path in gates:
        params[path] = gate_array(path, shapes[path][0], dtype)
    warn_gates(where, gates)


def write_hf(
    out_dir: str,
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray | LazyArray],
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_dir: str | None = None,
) -> list[str]:
    """Writes `params` (our flat dict; `LazyArray` values are loaded one at a time as the
    writer reaches them) as the new HF checkpoint directory `out_dir` (absent or empty);
    returns the shard files.

    Each shard is written tensor by tensor (`write_safetensors`), so with lazy values the
    memory held is about one tensor, whatever the shard size. Also writes `config.json` and
    copies tokenizer/processor files from `extra_dir` if given. Atomic: everything is written
    to a temporary sibling renamed to `out_dir` at the end.
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
    params: Mapping[str, np.ndarray | LazyArray],
    max_shard_bytes: int,
    extra_dir: str | None,
) -> list[str]:
    entries = []
    for path in params:
        x = params[path]
        key, kind = names.hf_name(path, layout="old")
        want = names.hf_shape(tuple(x.shape), kind, cfg)
        nbytes = int(np.prod(want, dtype=np.int64)) * np.dtype(x.dtype).itemsize
        entries.append((key, path, kind, want, np.dtype(x.dtype), nbytes))
    entries.sort(key=lambda e: e[0])
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e[5] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[5]
    n = len(shards)
    files, wm = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = [
            (key, want, dtype, hf_loader(params[path], kind, want))
            for key, path, kind, want, dtype, _ in shard
        ]
        write_safetensors(os.path.join(out_dir, fname), tensors, metadata={"format": "pt"})
        files.append(fname)
        wm.update({e[0]: fname for e in shard})
    total = sum(e[5] for e in entries)
    with open(os.path.join(out_dir, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
    dtypes = {str(e[4]) for e in entries}
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = "bfloat16" if "bfloat16" in dtypes else "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if extra_dir is not None:
        copy_extra_files(extra_dir, out_dir)
    return files


def hf_loader(
    x: np.ndarray | LazyArray, kind: str, shape: tuple[int, ...]
) -> Callable[[], np.ndarray]:
    """A loader of our tensor `x` in the HF layout (`shape`), reading it only when called."""
    return lambda: names.to_hf_array(materialize(x), kind, shape)


def write_safetensors(
    path: str,
    tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file tensor by tensor: `tensors` holds `(key, shape, dtype,
    loader)`, the header is written from the shapes and each loader is called only when its
    tensor's bytes are due, so one tensor is held at a time.

    The format: an 8-byte little-endian header length, the JSON header (`{key: {"dtype",
    "shape", "data_offsets"}}` and `__metadata__`, padded with spaces to a multiple of 8), then
    the tensors' little-endian bytes back to back in the header's order.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for key, shape, dtype, _ in tensors:
        if np.dtype(dtype) not in TO_SAFETENSORS_DTYPE:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": TO_SAFETENSORS_DTYPE[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype, load in tensors:
            arr = np.ascontiguousarray(load())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise CheckpointError(
                    f"{path}: tensor {key!r} loaded as {arr.dtype}{list(arr.shape)}, expected "
                    f"{np.dtype(dtype)}{list(shape)}"
                )
            f.write(arr.reshape(-1).view(np.uint8))  # NumPy arrays here are little-endian
            del arr


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
