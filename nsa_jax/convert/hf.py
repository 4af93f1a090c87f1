"""Hugging Face checkpoint directories <-> our flat parameter dicts.

Both directions stream: `inspect_hf` checks a directory from the shards' headers and hands back
one `LazyArray` per tensor (read with `safe_open` when loaded), and `write_hf` writes each
shard tensor by tensor, loading each lazy value only when its bytes are due. A conversion
therefore holds about one tensor at a time, whatever the model's size.

Everything is checked before anything is written: every file's header against its length,
the index against the shards, every tensor's name, shape and dtype against the config. The
source's files are recorded (`source.HFSource`) so that `write_hf` writes a checkpoint back
under its published file names, keys, key layout and `config.json`; without a record it
writes `model-0000i-of-0000N.safetensors` with a `model.safetensors.index.json`, the layout
of the official Qwen2.5-VL checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from safetensors import safe_open

from nsa_jax.config import QWEN_ARCH, ModelConfig, preset
from nsa_jax.convert import names
from nsa_jax.convert.files import (
    CheckpointError,
    Header,
    atomic_directory,
    copy_files,
    read_header,
    write_safetensors,
)
from nsa_jax.convert.lazy import LazyArray, materialize
from nsa_jax.convert.source import HFSource

__all__ = [
    "CheckpointError",
    "HFCheckpoint",
    "atomic_directory",
    "inspect_hf",
    "lazy_hf",
    "read_hf",
    "weight_map",
    "write_hf",
]

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
DEFAULT_SHARD_BYTES = 5 * 2**30  # as the official checkpoints
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
TIED_HEAD = "lm_head.weight"
GATE_KEY = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.g_proj_[12]\.")

log = logging.getLogger(__name__)

GATE_INIT_STD = 0.02  # VideoNSA's gate init: N(0, 0.02) weights, zero biases (gates start at 0.5)


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A Hugging Face directory, checked and ready to stream.

    Attributes:
      cfg: the model config (from config.json, or the one given).
      params: `{our_path: LazyArray}`, each read from its shard (in our layout) when loaded.
      source: the directory's files, keys and config, to write it back as found.
    """

    cfg: ModelConfig
    params: dict[str, LazyArray]
    source: HFSource


def copy_extra_files(src: str, dst: str) -> list[str]:
    """Copies the tokenizer/processor/generation files (`EXTRA_FILES`) present in `src` to
    `dst`."""
    return copy_files(src, dst, EXTRA_FILES)


def hf_files(hf_dir: str) -> tuple[dict[str, str], dict[str, Header], str | None]:
    """`({key: shard path}, {shard path: Header}, index text or None)` of an HF directory,
    every shard's header read and checked against its length, the index against the shards.

    Raises `CheckpointError` naming the file (and tensor) for a missing directory, index or
    shard, a damaged index, a damaged or truncated shard, or an index that disagrees with its
    shards.
    """
    if not os.path.isdir(hf_dir):
        what = "a file, not a directory" if os.path.exists(hf_dir) else "no such directory"
        raise CheckpointError(f"{hf_dir}: {what}; give the Hugging Face model directory")
    index = os.path.join(hf_dir, INDEX)
    single = os.path.join(hf_dir, SINGLE)
    if not os.path.exists(index):
        if not os.path.exists(single):
            shards = sorted(os.path.basename(p) for p in glob.glob(f"{hf_dir}/*.safetensors"))
            if shards:
                raise CheckpointError(
                    f"{index}: missing: {hf_dir} has {len(shards)} shard(s) ({shards[0]}, ...) "
                    f"but no index naming the shard of each tensor; copy it from the source"
                )
            raise CheckpointError(
                f"{hf_dir}: neither {INDEX} nor {SINGLE} found (not a Hugging Face checkpoint)"
            )
        header = read_header(single)
        return dict.fromkeys(header.tensors, single), {single: header}, None
    with open(index) as f:
        text = f.read()
    try:
        wm = json.loads(text)["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: damaged: {e!r}; copy it again from the source") from None
    headers: dict[str, Header] = {}
    out = {}
    for key, shard in wm.items():
        path = os.path.join(hf_dir, shard)
        if path not in headers:
            if not os.path.exists(path):
                raise CheckpointError(
                    f"{index}: shard {shard} (holding tensor {key!r}) is missing from {hf_dir}"
                )
            headers[path] = read_header(path)
        if key not in headers[path].tensors:
            raise CheckpointError(f"{path}: has no tensor {key!r}, which {INDEX} places there")
        out[key] = path
    for path, header in headers.items():
        unlisted = [k for k in header.tensors if k not in out]
        if unlisted:
            raise CheckpointError(
                f"{path}: tensor {unlisted[0]!r} ({len(unlisted)} in all) is not in {INDEX}"
            )
    return out, headers, text


def weight_map(hf_dir: str) -> dict[str, str]:
    """`{tensor key: shard file path}` from the index (or the single `model.safetensors`),
    every file checked (`hf_files`)."""
    return hf_files(hf_dir)[0]


def gate_layers(keys: Iterable[str]) -> tuple[int, ...]:
    """The decoder layers that have VideoNSA gate tensors (`g_proj_1/2`) among HF `keys`."""
    return tuple(sorted({int(m.group(1)) for k in keys if (m := GATE_KEY.match(k))}))


def hf_config(hf_dir: str, keys: Iterable[str]) -> ModelConfig:
    """The config of an HF directory with tensors `keys`: its config.json, NSA on when the
    tensors carry VideoNSA's gates (said in a warning when config.json does not say so)."""
    gated = gate_layers(keys)
    cfg = ModelConfig.from_hf(hf_dir, gated_layers=gated)
    if gated and ModelConfig.from_hf(hf_dir).nsa is None:
        n = cfg.text.num_hidden_layers
        log.warning(
            "%s declares %s, but its tensors carry VideoNSA's gates (g_proj_1/2) in %d of %d "
            "layers: loading with NSA on, VideoNSA's released setting (block %d, %d selected "
            "blocks, window %d, videonsa_compat); --preset chooses another",
            os.path.join(hf_dir, "config.json"),
            QWEN_ARCH,
            len(gated),
            n,
            cfg.nsa.block_size,
            cfg.nsa.num_selected,
            cfg.nsa.window,
        )
    return cfg


def preset_over(file_cfg: ModelConfig, name: str, where: str) -> ModelConfig:
    """The preset `name`, checked to describe the same model as `file_cfg` (read from `where`):
    its NSA setting and rope index style then replace the file's."""
    cfg = preset(name)
    for part in ("text", "vision"):
        mine, theirs = getattr(file_cfg, part), getattr(cfg, part)
        for f in dataclasses.fields(mine):
            a, b = getattr(mine, f.name), getattr(theirs, f.name)
            if a != b:
                raise CheckpointError(
                    f"{where}: {part} {f.name} is {a}, preset {name!r} has {b}; choose the "
                    "preset of this model, or none"
                )
    for f in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if getattr(file_cfg, f) != getattr(cfg, f):
            raise CheckpointError(
                f"{where}: {f} is {getattr(file_cfg, f)}, preset {name!r} has {getattr(cfg, f)}"
            )
    return cfg


def inspect_hf(
    hf_dir: str, cfg: ModelConfig | None = None, *, preset_name: str | None = None
) -> HFCheckpoint:
    """Checks an HF Qwen2.5-VL / VideoNSA directory and returns it as an `HFCheckpoint`,
    reading only the shards' headers.

    The config is `cfg`, else config.json's (`hf_config`: NSA on where the tensors carry
    VideoNSA's gates), replaced by the preset `preset_name` if given (which must describe the
    same model). Arrays keep their stored dtype (bf16 stays bf16: the round trip is bit-exact).
    Accepts both key layouts, and a tied `lm_head.weight` stored beside the embedding (it must
    hold the same bytes). Raises `CheckpointError` naming the file and the tensor for a
    damaged, truncated or missing file, a missing, unexpected, misshapen or non-float tensor.

    A `cfg` with NSA layers over a checkpoint without any gate tensors (plain Qwen2.5-VL, to be
    fine-tuned into VideoNSA) gets the gates initialised as VideoNSA does, N(0, 0.02) weights
    and zero biases, in the dtype of the stored embedding, and a warning says so. A checkpoint
    with only some of the gates the config needs is an error.
    """
    if cfg is not None and preset_name is not None:
        raise ValueError(f"give a config or a preset for {hf_dir}, not both")
    wm, headers, index = hf_files(hf_dir)
    if cfg is None:
        cfg = hf_config(hf_dir, wm)
        if preset_name is not None:
            cfg = preset_over(cfg, preset_name, os.path.join(hf_dir, "config.json"))
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
    tied = cfg.text.tie_word_embeddings and TIED_HEAD in wm
    unexpected = set(wm) - used - names.ignorable_hf_keys(wm, cfg)
    if unexpected:
        key = sorted(unexpected)[0]
        raise CheckpointError(
            f"{wm[key]}: unexpected tensor {key!r} ({len(unexpected)} unexpected in all) for "
            f"architecture {cfg.architecture} with this config"
        )
    out: dict[str, LazyArray] = {}
    for path, (key, kind) in found.items():
        file = wm[key]
        entry = headers[file].tensors[key]
        want = names.hf_shape(shapes[path][0], kind, cfg)
        if entry.shape != want:
            raise CheckpointError(
                f"{file}: tensor {key!r} has shape {list(entry.shape)}, expected {list(want)} "
                "from config.json"
            )
        if entry.dtype.name not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {key!r} has dtype {entry.dtype.name}; parameters are floating "
                f"point ({', '.join(FLOAT_DTYPES)})"
            )
        out[path] = LazyArray(shapes[path][0], entry.dtype, read_tensor(file, key, kind))
    if tied:
        path, (key, _) = "language.embed_tokens.embedding", found["language.embed_tokens.embedding"]
        head = headers[wm[TIED_HEAD]].tensors[TIED_HEAD]
        if (head.shape, head.dtype) != (out[path].shape, out[path].dtype):
            raise CheckpointError(
                f"{wm[TIED_HEAD]}: tensor {TIED_HEAD!r} ({head.dtype.name}{list(head.shape)}) "
                f"differs from {key!r} although tie_word_embeddings is true"
            )
        out[path] = dataclasses.replace(out[path], load=read_tied(wm[key], key, wm[TIED_HEAD]))
    if missing:
        dtype = out["language.embed_tokens.embedding"].dtype
        for path in missing:
            out[path] = LazyArray(
                shapes[path][0], dtype, functools.partial(gate_array, path, shapes[path][0], dtype)
            )
        warn_gates(hf_dir, missing)
    carried = used | ({TIED_HEAD} if tied else set())
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing; a model directory holds its config.json")
    with open(config_path) as f:
        config = f.read()
    source = HFSource(
        files={
            os.path.relpath(file, hf_dir): tuple(
                (k, e.dtype.name) for k, e in header.tensors.items() if k in carried
            )
            for file, header in headers.items()
        },
        metadata={os.path.relpath(file, hf_dir): h.metadata for file, h in headers.items()},
        config=config,
        index=index,
    )
    return HFCheckpoint(cfg, out, source)


def lazy_hf(
    hf_dir: str, cfg: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, LazyArray]]:
    """`inspect_hf`'s `(cfg, {our_path: LazyArray})`."""
    checked = inspect_hf(hf_dir, cfg)
    return checked.cfg, checked.params


def read_tensor(file: str, key: str, kind: str) -> Callable[[], np.ndarray]:
    """A loader of one tensor in our layout: opens the shard, reads the tensor, closes."""

    def load() -> np.ndarray:
        try:
            with safe_open(file, framework="np") as f:
                return names.from_hf_array(f.get_tensor(key), kind)
        except Exception as e:  # the file changed since it was checked
            raise CheckpointError(f"{file}: tensor {key!r} does not read: {e}") from None

    return load


def read_tied(file: str, key: str, head_file: str) -> Callable[[], np.ndarray]:
    """A loader of the embedding `key` that checks the stored tied `lm_head.weight` holds the
    same bytes (so writing the head back from the embedding is exact)."""
    embedding, head = read_tensor(file, key, "plain"), read_tensor(head_file, TIED_HEAD, "plain")

    def load() -> np.ndarray:
        x = embedding()
        if head().tobytes() != x.tobytes():
            raise CheckpointError(
                f"{head_file}: tensor {TIED_HEAD!r} differs from {key!r} although "
                "tie_word_embeddings is true"
            )
        return x

    return load


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


def check_params(
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray | LazyArray],
    where: str = "parameters",
    config_where: str = "the config",
) -> None:
    """Raises `CheckpointError` unless `params` (read from `where`) are exactly the parameters
    of `cfg` (from `config_where`): the same names and count, each of the config's shape and
    a floating-point dtype. The message names the parameter and both places."""
    shapes = names.our_param_shapes(cfg)
    missing = sorted(set(shapes) - set(params))
    unexpected = sorted(set(params) - set(shapes))
    if missing or unexpected:
        t = cfg.text
        first = (
            f"parameter {missing[0]!r} is missing"
            if missing
            else f"parameter {unexpected[0]!r} is unexpected"
        )
        raise CheckpointError(
            f"{where}: {len(params)} parameters where {config_where} (num_hidden_layers "
            f"{t.num_hidden_layers}, vision depth {cfg.vision.depth}, NSA "
            f"{'on' if cfg.nsa else 'off'}) describes {len(shapes)}: {first} "
            f"({len(missing)} missing, {len(unexpected)} unexpected in all)"
        )
    for path, (shape, _) in shapes.items():
        x = params[path]
        if tuple(x.shape) != shape:
            raise CheckpointError(
                f"{where}: parameter {path!r} has shape {list(x.shape)}, {config_where} "
                f"implies {list(shape)}"
            )
        if np.dtype(x.dtype).name not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{where}: parameter {path!r} has dtype {np.dtype(x.dtype).name}; parameters "
                f"are floating point ({', '.join(FLOAT_DTYPES)})"
            )


@dataclasses.dataclass(frozen=True)
class Planned:
    """One tensor as `write_hf` writes it: HF `key`, from our `path` in layout `kind`."""

    key: str
    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_files(
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray | LazyArray],
    source: HFSource | None,
    max_shard_bytes: int | None,
) -> tuple[list[tuple[str, list[Planned]]], bool]:
    """`([(file name, tensors in order)], as_source)`: the source's files, keys and order when
    `params` have exactly the source's keys and no shard size is asked for (`as_source`);
    else shards of at most `max_shard_bytes` (default 5 GiB) named
    `model-0000i-of-0000N.safetensors`, keys in the source's layout (the older one without a
    source)."""
    layout = source.key_layout if source is not None else "old"
    planned = []
    for path in params:
        x = params[path]
        key, kind = names.hf_name(path, layout=layout)
        shape = names.hf_shape(tuple(x.shape), kind, cfg)
        planned.append(Planned(key, path, kind, shape, np.dtype(x.dtype)))
    if source is not None and cfg.text.tie_word_embeddings and TIED_HEAD in source.keys:
        x = params["language.embed_tokens.embedding"]
        planned.append(
            Planned(
                TIED_HEAD,
                "language.embed_tokens.embedding",
                "plain",
                tuple(x.shape),
                np.dtype(x.dtype),
            )
        )
    by_key = {p.key: p for p in planned}
    if source is not None and max_shard_bytes is None and set(by_key) == source.keys:
        files = [(name, [by_key[k] for k, _ in keys]) for name, keys in source.files.items()]
        return files, True
    limit = DEFAULT_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    planned.sort(key=lambda p: p.key)
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    n = len(shards)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)], False


def hf_config_text(
    cfg: ModelConfig, source: HFSource | None, files: list[tuple[str, list[Planned]]]
) -> str:
    """The config.json to write: the source's own file when the checkpoint is still the model
    it describes (same config, same tensors and dtypes, in whatever files); else `cfg` merged
    into the source's file (`ModelConfig.merge_into_hf`), or `cfg.to_hf()` without a source;
    `torch_dtype` (or `dtype`) from the tensors."""
    dtypes = {p.dtype.name for _, shard in files for p in shard}
    if source is not None:
        written = {(p.key, p.dtype.name) for _, shard in files for p in shard}
        stored = {e for entries in source.files.values() for e in entries}
        if written == stored and source_config(source).to_hf() == cfg.to_hf():
            return source.config
        d = cfg.merge_into_hf(json.loads(source.config))
        if ModelConfig.from_hf(d).to_hf() != cfg.to_hf():
            raise CheckpointError(
                "the model's config cannot be written in the layout of the source's config.json; "
                "remove hf_source/ from the checkpoint to write the default layout"
            )
    else:
        d = cfg.to_hf()
    dtype_key = "dtype" if "dtype" in d else "torch_dtype"
    # transformers loads in this dtype: bf16 where any tensor is (norms may be kept in f32)
    if "bfloat16" in dtypes or len(dtypes) > 1:
        d[dtype_key] = "bfloat16" if "bfloat16" in dtypes else "float32"
    else:
        d[dtype_key] = dtypes.pop()
    return json.dumps(d, indent=2)


def source_config(source: HFSource) -> ModelConfig:
    """The config the source's config.json and tensors describe (`hf_config`'s rule)."""
    return ModelConfig.from_hf(json.loads(source.config), gated_layers=gate_layers(source.keys))


def write_hf(
    out_dir: str,
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray | LazyArray],
    *,
    max_shard_bytes: int | None = None,
    extra_dir: str | None = None,
    source: HFSource | None = None,
) -> list[str]:
    """Writes `params` (our flat dict; `LazyArray` values are loaded one at a time as the
    writer reaches them) as the new HF checkpoint directory `out_dir` (absent or empty);
    returns the shard files.

    `params` are checked against `cfg` first (`check_params`). With the `source` they came
    from, the files, keys, index and config.json are the source's (`plan_files`,
    `hf_config_text`) unless `max_shard_bytes` asks for other shards or the parameters no
    longer match it. Each shard is written tensor by tensor (`write_safetensors`), so with
    lazy values the memory held is about one tensor, whatever the shard size. Also copies
    tokenizer/processor files from `extra_dir` if given. Atomic: everything is written to a
    temporary sibling renamed to `out_dir` at the end.
    """
    check_params(cfg, params)
    files, as_source = plan_files(cfg, params, source, max_shard_bytes)
    config = hf_config_text(cfg, source, files)
    with atomic_directory(out_dir) as tmp:
        for name, shard in files:
            tensors = [
                (p.key, p.shape, p.dtype, hf_loader(params[p.path], p.kind, p.shape)) for p in shard
            ]
            metadata = source.metadata.get(name) if as_source else {"format": "pt"}
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            write_safetensors(os.path.join(tmp, name), tensors, metadata=metadata)
        if as_source and source.index is not None:
            index = source.index
        elif as_source:
            index = None
        else:
            total = sum(p.nbytes for _, shard in files for p in shard)
            wm = {p.key: name for name, shard in files for p in shard}
            index = json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2)
        if index is not None:
            with open(os.path.join(tmp, INDEX), "w") as f:
                f.write(index)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config)
        if extra_dir is not None:
            copy_extra_files(extra_dir, tmp)
    return [name for name, _ in files]


def hf_loader(
    x: np.ndarray | LazyArray, kind: str, shape: tuple[int, ...]
) -> Callable[[], np.ndarray]:
    """A loader of our tensor `x` in the HF layout (`shape`), reading it only when called."""
    return lambda: names.to_hf_array(materialize(x), kind, shape)
