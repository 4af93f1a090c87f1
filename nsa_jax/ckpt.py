"""What `--ckpt` names, for every command that loads a model, and `nsa-jax export`.

`resolve_ckpt` is the one place a directory is recognised as one of
  a run      `nsa-jax train --out RUN`: `RUN/checkpoints/<step>/`, of which the latest is used,
             and `RUN/tokenizer.json`;
  a step     one `RUN/checkpoints/<step>/` of such a run (items `state` and `config`);
  a model    our exported model (`nsa-jax export`, `nsa-jax convert hf-to-jax`): `config.json`,
             `params/` (orbax) and `hf_extra/` (tokenizer and processor files);
  an HF dir  `config.json` with `model.safetensors` or `model.safetensors.index.json` and its
             shards, and `tokenizer.json`.
Anything else is refused in one line saying what was expected. The readers below take the
resolved `ModelSource`: `load_model` and `read_params` for generation and evaluation,
`lazy_params` (one tensor at a time) for conversion and export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the model side is imported when a model is read, not to build the CLI
    import jax.numpy as jnp
    import numpy as np

    from nsa_jax.config import ModelConfig
    from nsa_jax.convert.lazy import LazyArray
    from nsa_jax.model.vlm import Qwen25VL

Kind = Literal["run", "step", "model", "hf"]
EXPORTED_FROM = "exported_from.json"  # in an exported model: the run and step it came from
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
STEP_ITEMS = ("state", "config")  # what a step directory needs to be read as a model


class CkptError(ValueError):
    """A `--ckpt` (or `nsa-jax export` RUN) that is not a model directory; the message starts
    with the option and the path."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved `--ckpt`.

    Attributes:
      kind: "run", "step", "model" or "hf".
      path: the directory as given.
      model_dir: where the weights are read: the step directory for a run or a step, else
        `path`.
      tokenizer_dir: where `tokenizer.json` and the processor files are: the run directory,
        the model's `hf_extra/`, or the HF directory.
      run, step: for a run or a step, the run directory and the step number; else None.
    """

    kind: Kind
    path: str
    model_dir: str
    tokenizer_dir: str
    run: str | None = None
    step: int | None = None

    def describe(self) -> str:
        if self.kind in ("run", "step"):
            return f"step {self.step} of the training run {self.run}"
        return {"model": "exported model", "hf": "Hugging Face directory"}[self.kind] + (
            f" {self.path}"
        )


def resolve_ckpt(path: str | os.PathLike | None, option: str = "--ckpt") -> ModelSource:
    """What `path` is: a run (its latest step), a step, an exported model or an HF directory.

    Raises:
      CkptError: `path` missing, not a directory, a run with no saved step yet, or none of the
        four; the message starts with `option` and `path`.
    """
    from nsa_jax.convert.checkpoint import EXTRA, is_checkpoint
    from nsa_jax.train.checkpoint import saved_steps

    if path is None or not os.fspath(path):
        raise CkptError(
            f"{option} is missing: give a training run, a step, an exported model "
            "or a Hugging Face directory"
        )
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CkptError(f"{option} {path}: no such directory")
    if not os.path.isdir(path):
        raise CkptError(
            f"{option} {path}: a file, not a directory; give the directory that holds it"
        )
    here = os.path.abspath(path)
    if is_checkpoint(here):
        return ModelSource("model", path, here, os.path.join(here, EXTRA))
    if os.path.isfile(os.path.join(here, "config.json")) and any(
        os.path.exists(os.path.join(here, f)) for f in HF_WEIGHTS
    ):
        return ModelSource("hf", path, here, here)
    if os.path.isdir(os.path.join(here, "checkpoints")):
        steps = saved_steps(here)
        if not steps:
            raise CkptError(
                f"{option} {path}: a training run with no saved step yet "
                f"({os.path.join(path, 'checkpoints')} is empty); train until a "
                "save (save_every) or give a step of another run"
            )
        step_dir = os.path.join(here, "checkpoints", str(steps[-1]))
        return ModelSource("run", path, step_dir, here, run=here, step=steps[-1])
    if all(os.path.isdir(os.path.join(here, i)) for i in STEP_ITEMS):
        parent, name = os.path.split(here)
        if os.path.basename(parent) != "checkpoints" or not name.isdigit():
            raise CkptError(
                f"{option} {path}: a training step outside its run; give it as "
                "RUN/checkpoints/N, where the run keeps its tokenizer"
            )
        run = os.path.dirname(parent)
        return ModelSource("step", path, here, run, run=run, step=int(name))
    raise CkptError(
        f"{option} {path}: not a run, step, exported model or HF directory; expected "
        "checkpoints/ (a run of nsa-jax train), state/ and config/ (a step, "
        "RUN/checkpoints/N), params/ (nsa-jax export) or config.json with model.safetensors "
        "(Hugging Face)"
    )


# ---------------------------------------------------------------------------------- readers


def read_params(
    source: ModelSource, config: ModelConfig | None = None
) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """`(config, {our_path: array})` on the host, arrays in their stored dtype; an exported
    model or an HF directory is read and checked by `nsa_jax.convert.load.load_params`.

    `config` reads the parameters for another config (training's `init_from`): an exported
    model's or HF directory's missing NSA gates are initialised as `load_params` says; a run's
    or a step's parameters must be exactly those of `config`'s model.

    Raises:
      CkptError: a run's or a step's parameter missing, unexpected or misshapen for `config`.
    """
    if source.kind in ("model", "hf"):
        from nsa_jax.convert.load import load_params

        return load_params(source.model_dir, config)
    from nsa_jax.convert.names import our_param_shapes
    from nsa_jax.train.checkpoint import read_step_params, step_config

    saved = step_config(source.model_dir).model
    params = read_step_params(source.model_dir)
    if config is None:
        return saved, params
    shapes = {name: shape for name, (shape, _) in our_param_shapes(config).items()}
    wrong = sorted(set(shapes) ^ set(params)) or sorted(
        n for n in shapes if tuple(params[n].shape) != shapes[n]
    )
    if wrong:
        n = wrong[0]
        why = (
            "is missing from the run"
            if n not in params
            else "is not in this config's model"
            if n not in shapes
            else f"has shape {list(params[n].shape)}, this config's model expects {list(shapes[n])}"
        )
        raise CkptError(
            f"{source.describe()}: parameter {n!r} {why} ({len(wrong)} such); the run was "
            "trained with another model config"
        )
    return config, params


def lazy_params(source: ModelSource) -> tuple[ModelConfig, dict[str, LazyArray]]:
    """`(config, {our_path: LazyArray})`: each tensor read only when loaded (conversion and
    export hold one tensor at a time)."""
    if source.kind == "model":
        from nsa_jax.convert.checkpoint import lazy_checkpoint

        return lazy_checkpoint(source.model_dir)
    if source.kind == "hf":
        from nsa_jax.convert.hf import lazy_hf

        return lazy_hf(source.model_dir)
    from nsa_jax.train.checkpoint import step_config, step_params

    return step_config(source.model_dir).model, step_params(source.model_dir)


def load_model(source: ModelSource, dtype: jnp.dtype) -> Qwen25VL:
    """The model of `source`, parameters cast to `dtype` (`convert.load.model_from_params`,
    which names a missing or misshapen parameter), one module per decoder layer whatever the
    run's `scan_layers`: inference runs the layers one at a time (`prefill.py`)."""
    from nsa_jax.convert.load import model_from_params

    cfg, params = read_params(source)
    return model_from_params(cfg.replace(scan_layers=False), params, dtype)


# ---------------------------------------------------------------------------------- export


def export_model(ckpt: str | os.PathLike, out: str | os.PathLike, *, replace: bool = False) -> bool:
    """Writes a run's latest step (or the step given) as our model checkpoint in `out`:
    `config.json`, `params/` (one tensor in memory at a time), `hf_extra/tokenizer.json` and
    `exported_from.json` (the run and step), all in a temporary sibling renamed into place.

    An `out` that already holds an export of the same run and step is kept as it is (returns
    False); one of another step is replaced when `replace` (the demo re-exports a run trained
    further), else refused, as is any other non-empty `out`. Returns True when written.

    Raises:
      CkptError: `ckpt` is not a run or a step, or its run keeps no `tokenizer.json`.
      ValueError: `out` is not empty and not replaceable.
    """
    from nsa_jax.convert.checkpoint import write_checkpoint_files
    from nsa_jax.convert.hf import atomic_directory

    source = resolve_ckpt(ckpt, "RUN")
    if source.kind == "model":
        raise CkptError(f"RUN {source.path}: already an exported model; give it as --ckpt")
    if source.kind == "hf":
        raise CkptError(
            f"RUN {source.path}: a Hugging Face directory; give it as --ckpt, or "
            "convert it with nsa-jax convert hf-to-jax"
        )
    if not os.path.isfile(os.path.join(source.tokenizer_dir, "tokenizer.json")):
        raise CkptError(
            f"RUN {source.path}: the run keeps no tokenizer.json in "
            f"{source.tokenizer_dir}; copy there the tokenizer.json it trained with"
        )
    out = os.fspath(out)
    origin = {"run": source.run, "step": source.step}
    previous = exported_from(out)
    if previous == origin:
        return False
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if previous is None or not replace:
            raise ValueError(
                f"--out {out}: not an empty directory"
                + (
                    ""
                    if previous is None
                    else f" (it holds step {previous['step']} of {previous['run']})"
                )
                + "; choose a new directory"
            )
        shutil.rmtree(out)
    cfg, params = lazy_params(source)
    with atomic_directory(out) as tmp:
        write_checkpoint_files(tmp, cfg, params, extra_from=source.tokenizer_dir)
        with open(os.path.join(tmp, EXPORTED_FROM), "w") as f:
            json.dump(origin, f, indent=2)
    return True


def exported_from(model_dir: str | os.PathLike) -> dict[str, object] | None:
    """`{"run": RUN, "step": N}` of a model written by `export_model`, else None."""
    marker = os.path.join(model_dir, EXPORTED_FROM)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------- CLI

DESCRIPTION = """\
Writes a training run's latest step (or the step directory given) as our model
checkpoint: DIR gets config.json (the model config), params/ (orbax), hf_extra/
(the run's tokenizer.json) and exported_from.json (the run and step). Streamed: one
tensor in memory at a time.

Every command's --ckpt also takes RUN (or its step directory) directly; an export
is a self-contained copy to keep, share, or convert with
`nsa-jax convert jax-to-hf --ckpt DIR --out HF_DIR`.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="a training run's latest step -> a model checkpoint (config, params, tokenizer)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="a run directory (nsa-jax train --out) or one of its steps (RUN/checkpoints/N)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="new model directory")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    # orbax's writer thread logs a failed write (a damaged step) with its whole traceback
    # before the error reaches us, and warnings about the step's item layout: the outcome is
    # said below in one line
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        source = resolve_ckpt(args.run, "RUN")
        written = export_model(args.run, args.out)
    except ValueError as e:
        print(f"nsa-jax export: error: {e}", file=sys.stderr)
        return 1
    finally:
        absl.setLevel(level)
    print(("exported " if written else "already exported: ") + f"{source.describe()} -> {args.out}")
    return 0
