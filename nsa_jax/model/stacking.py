"""Stacked decoder layers (`ModelConfig.scan_layers`, MaxText's scanned layout): the names and
the one seam between the two layouts of the parameters.

With `scan_layers` each run of alike consecutive decoder layers (hybrid or dense,
`layer_runs`) is stored as one module whose parameters carry a leading `[layers]` axis, named
by the run as a Python slice: layers 0..27 of the 7B are `language.layers.0:28.mlp.up_proj.kernel`
`[28, 3584, 18944]`, where the per-layer layout has `language.layers.3.mlp.up_proj.kernel`
`[3584, 18944]`. The scan slices that array per step, and its gradient comes out stacked, so
no stacked copy of the parameters or of their gradients is made per step; the optimiser's
moments are keyed by the same names and stacked alike.

Checkpoints of our model format and Hugging Face conversion use the per-layer names
(`unstack_layers`); the train state takes the model's layout (`in_layout`), and a train
checkpoint written in the other layout (before `scan_layers` stored stacks, or with
`scan_layers` switched) is converted when it is restored. Pure functions of names and arrays:
the leaf operations are arguments, so one code path serves NumPy, device arrays and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from nsa_jax.config import ModelConfig
from nsa_jax.model.layers import same_runs

Leaf = TypeVar("Leaf")

_STACKED = re.compile(r"^language\.layers\.(\d+):(\d+)\.(.+)$")
_LAYER = re.compile(r"^language\.layers\.(\d+)\.(.+)$")


def layer_runs(cfg: ModelConfig) -> list[range]:
    """Maximal runs of consecutive decoder layers alike (all hybrid or all dense): one scan,
    one stacked module each."""
    return same_runs([cfg.uses_nsa(i) for i in range(cfg.text.num_hidden_layers)])


def run_key(run: range) -> str:
    """The key of a run's stacked module under `language.layers`: `"0:28"`."""
    return f"{run.start}:{run.stop}"


def stacked_run(name: str) -> tuple[range, str] | None:
    """`language.layers.0:28.REST` -> `(range(0, 28), "REST")`; None for other names."""
    m = _STACKED.match(name)
    return None if m is None else (range(int(m[1]), int(m[2])), m[3])


def layer_template(name: str) -> str:
    """The per-layer name of a stacked parameter's first layer (a name's own for the rest):
    what the name-keyed rules (sharding, parameter groups) read."""
    got = stacked_run(name)
    return name if got is None else f"language.layers.{got[0].start}.{got[1]}"


def is_stacked(params: Mapping[str, Any]) -> bool:
    """Whether a flat parameter dict holds stacked layers."""
    return any(stacked_run(n) is not None for n in params)


def unstack_layers(
    params: Mapping[str, Leaf], take: Callable[[Leaf, int], Leaf] = lambda x, i: x[i]
) -> dict[str, Leaf]:
    """Any layout -> per-layer names: each stacked leaf split by `take(leaf, j)` (default: the
    `j`-th slice, a view of a NumPy array); other leaves as they are."""
    out: dict[str, Leaf] = {}
    for name, x in params.items():
        got = stacked_run(name)
        if got is None:
            out[name] = x
            continue
        run, rest = got
        for j, layer in enumerate(run):
            out[f"language.layers.{layer}.{rest}"] = take(x, j)
    return out


def stack_layers(
    cfg: ModelConfig,
    params: Mapping[str, Leaf],
    stack: Callable[[Sequence[Leaf]], Leaf] = np.stack,
) -> dict[str, Leaf]:
    """Per-layer names -> the stacked layout of `cfg`'s runs: the leaves of each run's layers
    under one name, joined by `stack` (default `np.stack`). A leaf some layer of its run lacks
    is left out (the caller names what is missing)."""
    out = {n: x for n, x in params.items() if _LAYER.match(n) is None}
    for run in layer_runs(cfg):
        first = f"language.layers.{run.start}."
        for name in [n for n in params if n.startswith(first)]:
            rest = name[len(first) :]
            leaves = [params.get(f"language.layers.{i}.{rest}") for i in run]
            if all(x is not None for x in leaves):
                out[f"language.layers.{run_key(run)}.{rest}"] = stack(leaves)
    return out


def in_layout(
    cfg: ModelConfig,
    params: Mapping[str, Leaf],
    stack: Callable[[Sequence[Leaf]], Leaf] = np.stack,
    take: Callable[[Leaf, int], Leaf] = lambda x, i: x[i],
) -> dict[str, Leaf]:
    """`params` (either layout) in the layout the model of `cfg` holds: stacked runs with
    `scan_layers`, per-layer names without. Returned as given when already so."""
    stacked = is_stacked(params)
    if stacked == cfg.scan_layers and (not stacked or _runs_of(params) == layer_runs(cfg)):
        return dict(params)
    flat = unstack_layers(params, take)
    return stack_layers(cfg, flat, stack) if cfg.scan_layers else flat


def tree_in_layout(
    cfg: ModelConfig,
    tree: Any,
    stack: Callable[[Sequence[Any]], Any] = np.stack,
    take: Callable[[Any, int], Any] = lambda x, i: x[i],
) -> Any:
    """`in_layout` on every dict of `tree` keyed by parameter names (a train state's
    parameters and the optimiser moments stored under their names); the rest as it is."""

    def convert(x: Any) -> Any:
        return in_layout(cfg, x, stack, take) if _holds_layers(x) else x

    return jax.tree.map(convert, tree, is_leaf=_holds_layers)


def _holds_layers(x: Any) -> bool:
    return isinstance(x, Mapping) and any(
        isinstance(n, str) and (_LAYER.match(n) or _STACKED.match(n)) for n in x
    )


def _runs_of(params: Mapping[str, Any]) -> list[range]:
    runs = {got[0] for n in params if (got := stacked_run(n)) is not None}
    return sorted(runs, key=lambda r: r.start)
