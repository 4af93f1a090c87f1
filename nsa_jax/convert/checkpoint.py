"""Our checkpoint format: an orbax checkpoint of the flat parameter dict plus the config.

Layout of `CKPT/`:
  `config.json`  the model config in Hugging Face form (`ModelConfig.to_hf`, NSA under "nsa");
  `params/`      orbax (`StandardCheckpointer`) of `{our_path: array}`;
  `hf_extra/`    tokenizer / processor files carried over from the source HF directory;
  `hf_source/`   the source HF directory's config.json, index and file layout
                 (`source.HFSource`), so that `jax-to-hf` writes it back as it was published.
Written atomically: into a temporary sibling directory renamed into place at the end.

Both directions stream when asked: `save_checkpoint` takes `LazyArray` values and writes them
one at a time (each loaded, written by tensorstore, dropped), and `lazy_checkpoint` returns
one `LazyArray` per parameter that restores that array alone.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import future

from nsa_jax.config import ModelConfig
from nsa_jax.convert.hf import CheckpointError, atomic_directory, check_params, copy_extra_files
from nsa_jax.convert.lazy import LazyArray
from nsa_jax.convert.source import HFSource, load_source, save_source

PARAMS = "params"
EXTRA = "hf_extra"


# orbax 0.12.8 deep-copies NumPy arrays before writing unless told not to (that copy would
# double the memory of a conversion); other releases (the GPU image's 0.12.4) take no such
# option
_NO_DEEPCOPY = (
    {"deepcopy_host_arrays": False}
    if "deepcopy_host_arrays"
    in inspect.signature(ocp.type_handlers.NumpyHandler.__init__).parameters
    else {}
)


class LazyArrayHandler(ocp.type_handlers.NumpyHandler):
    """Writes `LazyArray` leaves one after another: each is loaded, written and dropped before
    the next is loaded, so a save holds one array. Saved as plain NumPy arrays (`typestr`
    "np.ndarray"), so the checkpoint restores like any other."""

    def __init__(self) -> None:
        super().__init__(**_NO_DEEPCOPY)

    async def write_each(
        self,
        values: Sequence[LazyArray],
        infos: Sequence[ocp.type_handlers.ParamInfo],
        args: Sequence[ocp.SaveArgs],
    ) -> None:
        for value, info, arg in zip(values, infos, args, strict=True):
            arr = np.asarray(value.load())
            if arr.shape != tuple(value.shape) or arr.dtype != np.dtype(value.dtype):
                raise ValueError(
                    f"parameter {info.name!r} loaded as {arr.dtype}{list(arr.shape)}, expected "
                    f"{np.dtype(value.dtype)}{list(value.shape)}"
                )
            for f in await super().serialize([arr], [info], [arg]):
                f.result()  # written before the next array is loaded
            del arr

    async def serialize(  # type: ignore[override]
        self,
        values: Sequence[LazyArray],
        infos: Sequence[ocp.type_handlers.ParamInfo],
        args: Sequence[ocp.SaveArgs] | None = None,
    ) -> list[future.Future]:
        args = args or [ocp.SaveArgs()] * len(values)
        return [
            future.CommitFutureAwaitingContractedSignals(
                self.write_each(values, infos, args), name="lazy_array_handler"
            )
        ]


class _NoOcdbtMergeNotice(logging.Filter):
    """Drops orbax's warning, on finalising a save without OCDBT (a streamed one), that it
    found no OCDBT parts to merge: expected, and it names a temporary directory."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


@contextlib.contextmanager
def _no_ocdbt_merge_notice() -> Iterator[None]:
    absl, quiet = logging.getLogger("absl"), _NoOcdbtMergeNotice()
    absl.addFilter(quiet)
    try:
        yield
    finally:
        absl.removeFilter(quiet)


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS))


def save_checkpoint(
    path: str,
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray | LazyArray],
    *,
    extra_from: str | None = None,
    source: HFSource | None = None,
) -> None:
    """Writes `params` (flat dict, stored dtypes kept) and `cfg` to the new directory `path`
    (absent or empty), with the tokenizer files of `extra_from` and the record of the HF
    directory they came from (`source`) if given.

    Holds no copy of `params`: arrays are written from themselves, and `LazyArray` values are
    loaded one at a time as they are written. Atomic: written to a temporary sibling renamed
    to `path` at the end, so a failed run leaves no directory with a config but partial
    params."""
    with atomic_directory(path) as tmp:
        write_checkpoint_files(tmp, cfg, params, extra_from, source)


def write_checkpoint_files(
    path: str,
    cfg: ModelConfig,
    params: Mapping[str, np.ndarray | LazyArray],
    extra_from: str | None,
    source: HFSource | None = None,
) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(**_NO_DEEPCOPY)),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
        (LazyArray, LazyArrayHandler()),
    )
    tree = {k: v if isinstance(v, LazyArray) else np.asarray(v) for k, v in params.items()}
    # a streamed save writes one zarr array per parameter: orbax's OCDBT writer would keep a
    # reference to every array it has written until the checkpoint is finalised, holding the
    # whole model again; arrays held anyway go to OCDBT (fewer files). Restores read both.
    streamed = any(isinstance(v, LazyArray) for v in tree.values())
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=not streamed)
    with _no_ocdbt_merge_notice(), ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.join(path, PARAMS), args=ocp.args.PyTreeSave(tree))
    if extra_from is not None:
        copy_extra_files(extra_from, os.path.join(path, EXTRA))
    if source is not None:
        save_source(path, source)


def load_checkpoint(path: str) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Reads `(cfg, {our_path: array})` from a directory written by `save_checkpoint`."""
    path = os.path.abspath(path)
    cfg = ModelConfig.from_hf(os.path.join(path, "config.json"))
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(os.path.join(path, PARAMS))
    return cfg, {k: np.asarray(v) for k, v in tree.items()}


def lazy_checkpoint(path: str) -> tuple[ModelConfig, dict[str, LazyArray]]:
    """`(cfg, {our_path: LazyArray})` of a directory written by `save_checkpoint`, from the
    orbax metadata alone; each `load()` restores that one array.

    Raises `CheckpointError` naming the file for a missing or unreadable config.json or
    `params/`."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory")
    cfg = ModelConfig.from_hf(os.path.join(path, "config.json"))
    params_dir = os.path.join(path, PARAMS)
    if not os.path.isdir(params_dir):
        raise CheckpointError(
            f"{params_dir}: missing; our checkpoint is config.json with the parameters in "
            f"{PARAMS}/ (as `nsa-jax convert hf-to-jax` writes it)"
        )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir).item_metadata.tree
        params = {
            name: LazyArray(tuple(m.shape), np.dtype(m.dtype), restore_one(params_dir, name))
            for name, m in meta.items()
        }
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(
            f"{params_dir}: damaged: its orbax metadata does not read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return cfg, params


def inspect_checkpoint(
    path: str,
) -> tuple[ModelConfig, dict[str, LazyArray], HFSource | None]:
    """`lazy_checkpoint` with every parameter checked against config.json (`check_params`:
    names, count, shapes, dtypes), and the HF source record if the checkpoint has one."""
    cfg, params = lazy_checkpoint(path)
    path = os.path.abspath(path)
    check_params(cfg, params, os.path.join(path, PARAMS), os.path.join(path, "config.json"))
    return cfg, params, load_source(path)


def restore_one(params_dir: str, name: str) -> Callable[[], np.ndarray]:
    """A loader of one array of an orbax checkpoint (a partial restore)."""

    def load() -> np.ndarray:
        args = ocp.args.PyTreeRestore(
            item={name: 0},
            restore_args={name: ocp.RestoreArgs(restore_type=np.ndarray)},
            partial_restore=True,
        )
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                return np.asarray(ckptr.restore(params_dir, args=args)[name])
        except Exception as e:  # tensorstore / orbax errors of a damaged file
            raise CheckpointError(
                f"{params_dir}: parameter {name!r} does not restore ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None

    return load
