"""The files of a conversion: safetensors read (header checked against the file) and written
tensor by tensor, and directories written atomically. Pure file handling: nothing here knows
the model.

A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON header
(`{key: {"dtype", "shape", "data_offsets": [begin, end]}}` and an optional `__metadata__` of
strings), then the tensors' little-endian bytes back to back, offsets counted from the end of
the header.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

# the safetensors library refuses headers above 100 MB; a larger length is a damaged file
MAX_HEADER_BYTES = 100_000_000

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its shape, dtype and where its bytes lie."""

    shape: tuple[int, ...]
    dtype: np.dtype
    begin: int
    end: int


@dataclasses.dataclass(frozen=True)
class Header:
    """A safetensors file's header, checked against the file's length.

    Attributes:
      tensors: `{key: TensorEntry}` in the order of their bytes in the file.
      metadata: the `__metadata__` strings (`{}` when absent).
    """

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(file: str) -> Header:
    """Reads and checks the header of the safetensors file `file` without reading its tensors.

    Raises `CheckpointError` naming the file (and the tensor) when the file is empty or shorter
    than its header, the header is not JSON, a tensor has an unknown dtype, a shape that does
    not fit its byte range, or the byte ranges leave gaps, overlap or run past the file's end.
    """
    size = os.path.getsize(file)
    if size == 0:
        raise CheckpointError(f"{file}: the file is empty (0 bytes); copy it again from its source")
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated: {size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{file}: truncated or not a safetensors file: its header length says {n} bytes, "
                f"the file has {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: damaged: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: damaged: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {key: _entry(file, key, value) for key, value in header.items()}
    tensors = dict(sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)))
    offset = 0
    for key, e in tensors.items():
        if e.begin != offset:
            raise CheckpointError(
                f"{file}: damaged: tensor {key!r} starts at byte {e.begin} of the data, "
                f"expected {offset} (gap or overlap)"
            )
        offset = e.end
    have = size - 8 - n
    if offset > have:
        key = next(k for k, e in tensors.items() if e.end > have)
        raise CheckpointError(
            f"{file}: truncated: its tensors need {offset} bytes after the header, the file has "
            f"{have} (tensor {key!r} is cut off); copy the file again from its source"
        )
    if offset < have:
        raise CheckpointError(
            f"{file}: damaged: {have - offset} bytes follow the last tensor the header lists"
        )
    return Header(tensors, dict(metadata))


def _entry(file: str, key: str, value: object) -> TensorEntry:
    try:
        dtype_name, shape, (begin, end) = value["dtype"], value["shape"], value["data_offsets"]  # type: ignore[index]
        shape = tuple(int(s) for s in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(
            f"{file}: damaged: the header entry of tensor {key!r} is not "
            '{"dtype", "shape", "data_offsets": [begin, end]}'
        ) from None
    if dtype_name not in FROM_SAFETENSORS_DTYPE:
        raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {dtype_name}")
    dtype = FROM_SAFETENSORS_DTYPE[dtype_name]
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if min(shape, default=0) < 0 or end - begin != nbytes:
        raise CheckpointError(
            f"{file}: damaged: tensor {key!r} ({dtype_name}{list(shape)}, {nbytes} bytes) has "
            f"the byte range [{begin}, {end})"
        )
    return TensorEntry(shape, dtype, begin, end)


def write_safetensors(
    path: str,
    tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file tensor by tensor: `tensors` holds `(key, shape, dtype,
    loader)`, the header is written from the shapes and each loader is called only when its
    tensor's bytes are due, so one tensor is held at a time. Tensors are stored in the given
    order; the header is padded with spaces to a multiple of 8 bytes.
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


def copy_files(src: str, dst: str, file_names: Sequence[str]) -> list[str]:
    """Copies those of `file_names` present in `src` to `dst` (created); returns them."""
    copied = []
    os.makedirs(dst, exist_ok=True)
    for name in file_names:
        path = os.path.join(src, name)
        if os.path.exists(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied
