"""Train checkpoints with orbax: state + data iterator + config in one step directory.

`OUT/checkpoints/<step>/` holds four items:
  `state`   the `TrainState` (step, trainable and frozen parameters, optimiser state, skip
            counters) as a dict of arrays (`StandardSave`; restored onto any mesh);
  `data`    the grain iterator's state (`grain.checkpoint`), so the data resumes exactly;
  `config`  the run's `TrainConfig` (JSON), checked against the resuming run's;
  `meta`    step, global batch rows and wall time.

The decoder layers are saved in the run's layout (`model/stacking.py`: stacked with
`model.scan_layers`); a checkpoint in the other layout (written before layers were stored
stacked, or with `scan_layers` switched since) is restored in its own and then converted. A
step's parameters read alone (`step_params`, `read_step_params`) come per layer.

Saves are asynchronous (the device-to-host copy happens in `save`, the writes in the
background) and atomic: orbax writes into a temporary directory and renames it when every item
is written, so a process killed mid-save leaves no step directory, only a temporary one that
is removed at the next start. Kept: the last `keep_last` steps, plus the `keep_best` with the
lowest eval loss among the steps saved with one. A step past keeping is first renamed into
`OUT/checkpoints/.deleted/` (one atomic rename), then removed from there: a process ended
mid-removal leaves part of a directory that is no step, emptied at the next start.

A resumed run takes the newest step that restores (`resume_steps`, `restore_newest`); a newer
one that does not is reported and kept aside as `<step>.damaged`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers as policies

from nsa_jax.config import upgrade_model_dict
from nsa_jax.convert.lazy import LazyArray
from nsa_jax.model import stacking
from nsa_jax.train import distributed
from nsa_jax.train.config import TrainConfig, from_dict, to_dict
from nsa_jax.train.step import TrainState

ITEMS = ("state", "data", "config", "meta")
# Where steps past keeping go before their files are removed (not a step name to orbax).
DELETED = ".deleted"
# the parameter groups of a saved `state`: trainable and frozen, both named by our flat paths
PARAM_GROUPS = ("params", "frozen")

# Config keys (or whole sections) a resumed run may change: they steer the run, not the
# training it does.
RUN_KEYS = frozenset({
    "name", "steps", "save_every", "keep_last", "keep_best", "eval_every", "eval_batches",
    "max_bad_steps", "peak_tflops", "tensorboard", "mesh", "per_shard_batch", "loss_chunk",
    "init_from", "tokenizer", "eval_annotations", "model.attention.implementation",
    "model.attention.tpu_blocks", "model.attention.gpu_blocks", "model.remat",
    "model.remat_policy", "model.scan_layers", "model.vision_remat", "data.num_workers",
    "data.video_cache_mb",
})


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: the message names the directory and why."""


class DamagedCheckpoint(CheckpointError):
    """A step whose files do not read back: an item missing, a file truncated or corrupt."""


def _innermost(e: BaseException) -> str:
    """The first line of the innermost cause: orbax wraps TensorStore's error (which names
    the array and the file) in several layers of context."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _state_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "frozen": state.frozen,
            "opt_state": state.opt_state, "skipped": state.skipped,
            "bad_in_row": state.bad_in_row}


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys (outside `RUN_KEYS`) whose values differ, as `key: saved -> current`. A
    config saved before the attention settings moved under `model.attention` is read in
    today's layout."""
    if isinstance(saved.get("model"), Mapping):
        saved = {**saved, "model": upgrade_model_dict(dict(saved["model"]))}
    a, b = _flat(saved), _flat(current)
    out = []
    for key in sorted(set(a) | set(b)):
        parts = key.split(".")
        steers = any(".".join(parts[:i]) in RUN_KEYS for i in range(1, len(parts) + 1))
        if steers or a.get(key) == b.get(key):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


class Checkpoints:
    """The run's checkpoint manager (`OUT/checkpoints`)."""

    def __init__(self, out_dir: str | os.PathLike, cfg: TrainConfig) -> None:
        self.directory = os.path.join(os.path.abspath(out_dir), "checkpoints")
        self.cfg = cfg
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=cfg.keep_last)]
        if cfg.keep_best:
            keep.append(policies.BestN(
                get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=cfg.keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(keep),
                cleanup_tmp_directories=True,
                todelete_subdir=DELETED,
                enable_async_checkpointing=True,
                create=True,
            ),
        )
        self._empty_deleted()

    def _empty_deleted(self) -> None:
        """Removes the steps renamed into `DELETED` (process 0: the others see its files)."""
        if jax.process_index() == 0:
            shutil.rmtree(os.path.join(self.directory, DELETED), ignore_errors=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        state: TrainState,
        data_iterator: grain.DatasetIterator,
        *,
        global_batch: int,
        eval_loss: float | None = None,
    ) -> None:
        """Starts an asynchronous save of the state at its step (returns once the arrays are
        copied to the host, so the state may be donated to the next step right after)."""
        step = int(state.step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_state_dict(state)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(to_dict(self.cfg)),
            meta=ocp.args.JsonSave({"step": step, "global_batch": global_batch}),
        )
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        self.manager.save(step, args=args, metrics=metrics)

    def check(self, step: int, global_batch: int) -> None:
        """Raises `CheckpointError` unless `step` has every item, was written by this config
        (keys outside `RUN_KEYS`) and with this global batch."""
        where = os.path.join(self.directory, str(step))
        found = sorted(i for i in ITEMS if os.path.isdir(os.path.join(where, i)))
        missing = [i for i in ITEMS if i not in found]
        if missing:
            raise DamagedCheckpoint(
                f"checkpoint {where} has no {', '.join(repr(m) for m in missing)} item "
                f"(found: {', '.join(found) or 'nothing'}); it was not written by `nsa-jax "
                "train`, or was damaged"
            )
        try:
            got = self.manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for bad files
            raise DamagedCheckpoint(f"checkpoint {where} does not restore: {_innermost(e)}") from e
        diffs = config_differences(got["config"], to_dict(self.cfg))
        if diffs:
            raise CheckpointError(
                f"checkpoint {where} was written by another config; differences (saved -> "
                f"now): {'; '.join(diffs)}"
            )
        if got["meta"]["global_batch"] != global_batch:
            raise CheckpointError(
                f"checkpoint {where} was trained with {got['meta']['global_batch']} rows per "
                f"micro-batch, this run has {global_batch} (per_shard_batch x data x fsdp): "
                "the data would not resume where it stopped"
            )

    def restore(
        self,
        step: int,
        abstract_state: TrainState,
        data_iterator: grain.DatasetIterator,
        *,
        global_batch: int,
    ) -> TrainState:
        """The state of `step` placed as `abstract_state`'s shardings say (any mesh); sets
        `data_iterator` to where that step's run stood.

        Raises:
          DamagedCheckpoint: an item is missing, or a file does not read back (or the arrays
            do not fit the model).
          CheckpointError: the config differs in a key outside `RUN_KEYS`, or the global
            batch differs.
        """
        self.check(step, global_batch)
        where = os.path.join(self.directory, str(step))
        # the decoder layers as written: per layer (before they were stored stacked, or
        # without `scan_layers`) or stacked; restored so, then put in this run's layout
        target = _state_dict(abstract_state)
        model = self.cfg.model.replace(
            scan_layers=stacking.is_stacked({**target["params"], **target["frozen"]}))
        try:
            saved = model.replace(scan_layers=_written_stacked(where))
            if saved.scan_layers != model.scan_layers:
                target = stacking.tree_in_layout(saved, target, _stack_abstract, _take_abstract)
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ))
        except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for bad files
            raise DamagedCheckpoint(f"checkpoint {where} does not restore: {_innermost(e)}") from e
        s = stacking.tree_in_layout(model, got["state"], _stack_arrays, _take_array)
        return TrainState(step=s["step"], params=s["params"], frozen=s["frozen"],
                          opt_state=s["opt_state"], skipped=s["skipped"],
                          bad_in_row=s["bad_in_row"])

    def resume_steps(self, global_batch: int, resume_from: int | None = None) -> list[int]:
        """The steps a resumed run tries, newest first: `resume_from` alone, or every step.
        The newest that is not damaged is checked against this run (`check`) here, before
        the model and the data are built.

        Raises:
          CheckpointError: `resume_from` is no step here, or the config or the global batch
            differ from the checkpoint's.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if resume_from is not None:
            if resume_from not in steps:
                raise CheckpointError(
                    f"--resume-from {resume_from}: {self.directory} has no step {resume_from} "
                    f"(steps: {', '.join(map(str, steps[::-1])) or 'none'})"
                )
            steps = [resume_from]
        for step in steps:
            try:
                self.check(step, global_batch)
            except DamagedCheckpoint:
                continue  # reported by `restore_newest`, which meets it first
            break
        return steps

    def restore_newest(
        self,
        steps: list[int],
        abstract_state: TrainState,
        data_iterator: grain.DatasetIterator,
        *,
        global_batch: int,
    ) -> tuple[TrainState, int, list[str]]:
        """The state of the first of `steps` (newest first) that restores on every host, that
        step (see `restore`), and a one-line report (the step, the file, why) of each newer
        step that did not restore.

        Each newer step is then kept aside, renamed, not deleted: one that does not restore
        as `<step>.damaged`; one newer than a chosen `resume_from` as
        `<step>.newer-than-<restored step>`. Nothing is set aside when no step restores (the
        reason is then more likely the run than the files).

        Raises:
          CheckpointError: no step of `steps` restores (each one's reason), or a step's config
            or global batch differ from this run's.
        """
        failed: dict[int, str] = {}
        for step in steps:
            try:
                state = self.restore(step, abstract_state, data_iterator,
                                     global_batch=global_batch)
            except DamagedCheckpoint as e:
                failed[step] = str(e)
                quiet_late_read_errors()
            # every host must resume from the same step: one host's bad read fails it on all
            if min(distributed.every_host(int(step not in failed))) == 0:
                failed.setdefault(step, f"checkpoint {self.directory}/{step} does not restore "
                                        "on another host")
                continue
            reports = []
            for newer in [n for n in self.all_steps() if n > step]:
                why = failed.get(newer)
                aside = self._set_aside(newer, "damaged" if why else f"newer-than-{step}")
                if why:
                    reports.append(f"{why}; kept aside as {aside}, resumed from step {step}")
            return state, step, reports
        raise CheckpointError("no checkpoint restores: " + "; ".join(failed.values()))

    def _set_aside(self, step: int, suffix: str) -> str:
        """Renames step `step` to `<step>.<suffix>` (`.1`, `.2`, ... after it when taken), no
        step name to orbax; returns the new path."""
        where = os.path.join(self.directory, str(step))
        target = f"{where}.{suffix}"
        n = 0
        while os.path.exists(target if not n else f"{target}.{n}"):
            n += 1
        target = target if not n else f"{target}.{n}"
        distributed.barrier(f"set aside {step}")  # every host has read its state first
        if jax.process_index() == 0:
            os.rename(where, target)
        distributed.barrier(f"set aside {step} done")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until every started save is on disk (and the steps past keeping are gone)."""
        self.manager.wait_until_finished()
        self._empty_deleted()

    def close(self) -> None:
        self.manager.close()


def _late_read_error(exc: BaseException | None, tb: Any) -> bool:
    """Whether an exception is a read of a failed restore ending after orbax gave up on it:
    orbax reads the arrays concurrently and, at the first failure, closes its event loop with
    the others in flight; those fail later (`Event loop is closed`, raised by the coroutine
    when collected or by the thread pool's done-callback that hands a result to the closed
    loop, or their own read error), each printed as a long traceback about the step already
    reported."""
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return True
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _DropLateReadErrors(logging.Filter):
    """Drops the thread pool's log records of late read errors (`concurrent.futures` logs an
    exception raised by a done-callback, with its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        return not (exc and _late_read_error(exc[1], exc[2]))


def quiet_late_read_errors() -> None:
    """From now on, drops the late read errors of a failed restore (`_late_read_error`) from
    `sys.unraisablehook` and from the thread pool's log (every other exception is printed as
    before), and collects the failed reads' coroutines now."""
    hook = sys.unraisablehook
    if getattr(hook, "drops_late_read_errors", False):
        return

    def quiet(unraisable: Any) -> None:
        if not _late_read_error(unraisable.exc_value, unraisable.exc_traceback):
            hook(unraisable)

    quiet.drops_late_read_errors = True  # type: ignore[attr-defined]
    sys.unraisablehook = quiet
    logging.getLogger("concurrent.futures").addFilter(_DropLateReadErrors())
    gc.collect()


# ------------------------------------------------------------------ a run's steps, read alone


def saved_steps(run_dir: str | os.PathLike) -> list[int]:
    """The steps of a run directory (`RUN/checkpoints/<step>/`), oldest first. Orbax writes a
    step under a temporary name and renames it when whole, so every step listed is complete."""
    where = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(where):
        return []
    return sorted(int(s) for s in os.listdir(where)
                  if s.isdigit() and os.path.isdir(os.path.join(where, s)))


class _ItemReadAlone(logging.Filter):
    """Drops orbax's warning that an item directory has no metadata file of its own: the
    readers below read one item of a step (`state`, `config`) by itself, and the step's
    metadata file is one level up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _reading_one_item() -> Iterator[None]:
    absl, quiet = logging.getLogger("absl"), _ItemReadAlone()
    absl.addFilter(quiet)
    try:
        yield
    finally:
        absl.removeFilter(quiet)


def step_config(step_dir: str | os.PathLike) -> TrainConfig:
    """The `TrainConfig` a step was trained with (its `config` item).

    Raises:
      DamagedCheckpoint: the item does not read back."""
    where = os.path.join(os.path.abspath(step_dir), "config")
    try:
        with _reading_one_item(), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            saved = ckptr.restore(where)
    except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for bad files
        raise DamagedCheckpoint(f"checkpoint {step_dir} does not restore: {_innermost(e)}") from e
    return from_dict(TrainConfig, saved, where=where)


def step_params(step_dir: str | os.PathLike) -> dict[str, LazyArray]:
    """The model parameters of a step (trainable and frozen) as `{our_path: LazyArray}` per
    layer, from the orbax metadata alone: each `load()` restores that one array on the host
    (a stacked run's array is read at the first of its layers loaded and kept until each has
    been), and the optimiser state is never read. Raises `DamagedCheckpoint` (here or at a
    `load()`) for a step whose files do not read back."""
    state, tree = _state_metadata(step_dir)
    return _lazy_layers(
        {name: LazyArray(tuple(m.shape), np.dtype(m.dtype), _step_array(state, group, name))
         for group in PARAM_GROUPS for name, m in (tree.get(group) or {}).items()})


def read_step_params(step_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The model parameters of a step (trainable and frozen) as host arrays, in one partial
    restore (the optimiser state is not read).

    Raises:
      DamagedCheckpoint: the step's files do not read back."""
    state, tree = _state_metadata(step_dir)
    item = {g: dict.fromkeys(tree[g], 0) for g in PARAM_GROUPS if tree.get(g)}
    got = _restore_on_host(state, item, what=f"checkpoint {step_dir}")
    return stacking.unstack_layers(
        {name: np.asarray(v) for group in got.values() for name, v in group.items()})


class _LayerSlices:
    """The layers of one stacked `LazyArray`, each a `LazyArray` of its own: the stack is read
    at the first layer's load and dropped once every layer has been loaded."""

    def __init__(self, stacked: LazyArray) -> None:
        self.stacked, self.value, self.left = stacked, None, set(range(stacked.shape[0]))

    def load(self, j: int) -> np.ndarray:
        if self.value is None:
            self.value = self.stacked.load()
        out = np.array(self.value[j])
        self.left.discard(j)
        if not self.left:
            self.value, self.left = None, set(range(self.stacked.shape[0]))
        return out


def _lazy_layers(params: dict[str, LazyArray]) -> dict[str, LazyArray]:
    """`stacking.unstack_layers` of lazy arrays: each layer of a stacked array a `LazyArray`
    reading it through one `_LayerSlices`."""
    shared = {id(x): _LayerSlices(x) for n, x in params.items() if stacking.stacked_run(n)}

    def take(x: LazyArray, j: int) -> LazyArray:
        return LazyArray(x.shape[1:], x.dtype, functools.partial(shared[id(x)].load, j))

    return stacking.unstack_layers(params, take)


def _state_metadata(step_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """`(state item directory, its array metadata tree)`."""
    state = os.path.join(os.path.abspath(step_dir), "state")
    try:
        with _reading_one_item(), ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(state)
    except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for bad files
        raise DamagedCheckpoint(f"checkpoint {step_dir} does not restore: {_innermost(e)}") from e
    if meta is None or meta.item_metadata is None:
        raise DamagedCheckpoint(f"checkpoint {step_dir} does not restore: {state} has no "
                                "readable metadata")
    return state, meta.item_metadata.tree


def _step_array(state: str, group: str, name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        got = _restore_on_host(state, {group: {name: 0}},
                               what=f"parameter {name!r} of {os.path.dirname(state)}")
        return np.asarray(got[group][name])

    return load


def _restore_on_host(state: str, item: dict[str, dict[str, int]], what: str) -> dict[str, Any]:
    """The arrays of `item` (`{group: {name: _}}`) of a saved state, as NumPy arrays: whatever
    mesh saved them, they are read onto this host alone. A failed read raises
    `DamagedCheckpoint` saying `what` does not restore."""
    restore_args = {g: {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}
                    for g, names in item.items()}
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    try:
        with _reading_one_item(), ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(state, args=args)
    except Exception as e:  # noqa: BLE001 - orbax raises bare Exceptions for bad files
        quiet_late_read_errors()
        raise DamagedCheckpoint(f"{what} does not restore: {_innermost(e)}") from e


@jax.jit
def _all_finite(params: Any) -> jax.Array:
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(params)
             if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def is_finite_state(state: TrainState) -> bool:
    """Whether every floating parameter is finite (a state that may be saved).

    One compiled program for the whole tree, not two eager ops per parameter: XLA:CPU
    deadlocks once a few dozen sharded reductions are dispatched back to back without the
    host waiting (each device admits 32 computations in flight; seen with 8 CPU devices in
    one process and in two; `docs/training.md`, "Multi-process CPU runs")."""
    return bool(_all_finite(state.params))


def _written_stacked(where: str) -> bool:
    """Whether the train state of the step directory `where` holds stacked decoder layers."""
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(where) / "state").tree
    return stacking.is_stacked({**(tree.get("params") or {}), **(tree.get("frozen") or {})})


def _leading(sh: NamedSharding, ndim: int) -> tuple[Any, ...]:
    return (*sh.spec, *([None] * (ndim - len(sh.spec))))


def _stack_abstract(xs: Sequence[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
    x = xs[0]
    spec = PartitionSpec(None, *_leading(x.sharding, x.ndim))
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype,
                                sharding=NamedSharding(x.sharding.mesh, spec))


def _take_abstract(x: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
    spec = PartitionSpec(*_leading(x.sharding, x.ndim)[1:])
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                sharding=NamedSharding(x.sharding.mesh, spec))


def _stack_arrays(xs: Sequence[jax.Array]) -> jax.Array:
    """One layer run's restored arrays stacked in place of them (each freed once stacked)."""
    out = jax.jit(lambda *a: jnp.stack(a), out_shardings=_stack_abstract(xs).sharding)(*xs)
    for x in xs:
        x.delete()
    return out


def _take_array(x: jax.Array, i: int) -> jax.Array:
    return jax.jit(lambda a: a[i], out_shardings=_take_abstract(x, i).sharding)(x)
