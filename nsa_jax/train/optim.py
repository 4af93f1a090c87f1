"""The optimiser: AdamW with warm-up + cosine decay, global-norm clipping, a weight-decay mask
and parameter groups (vision tower, merger, language model, NSA gates), each with its own peak
learning rate and a freeze switch.

A frozen group is not part of the trainable parameters at all (no gradient is computed for it,
no optimiser state is kept), so freezing the 7B language model to train the gates alone also
saves the moments' memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nsa_jax.convert.names import is_gate
from nsa_jax.train.config import GroupConfig, TrainConfig

GROUPS = ("vision", "merger", "language", "gates")


def group_of(name: str) -> str:
    """The parameter group of our flat parameter path."""
    if is_gate(name):
        return "gates"
    if name.startswith("visual.merger."):
        return "merger"
    if name.startswith("visual."):
        return "vision"
    return "language"


def group_config(cfg: TrainConfig, group: str) -> GroupConfig:
    return getattr(cfg.optim, group)


def is_frozen(cfg: TrainConfig, name: str) -> bool:
    return group_config(cfg, group_of(name)).frozen


def decays(name: str, ndim: int) -> bool:
    """Weight decay on matrices (kernels, embeddings) only: never on norms or biases."""
    return ndim >= 2 and not name.endswith((".bias", "norm.weight"))


def schedule(cfg: TrainConfig, peak: float) -> optax.Schedule:
    """Linear warm-up from 0 over `cfg.warmup_steps`, then cosine decay to
    `peak * final_lr_frac` at `cfg.steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=peak * cfg.optim.final_lr_frac,
    )


def peak_lr(cfg: TrainConfig, group: str) -> float:
    lr = group_config(cfg, group).lr
    return cfg.optim.lr if lr is None else lr


class GroupLRState(NamedTuple):
    count: jax.Array  # int32 []: updates applied so far


def scale_by_group_lr(
    schedules: Mapping[str, optax.Schedule], labels: Mapping[str, str]
) -> optax.GradientTransformation:
    """Multiplies each parameter's update by `-schedule(count)` of its group (optax's
    `scale_by_learning_rate`, one schedule per group, one shared count)."""

    def init(params: optax.Params) -> GroupLRState:
        del params
        return GroupLRState(jnp.zeros((), jnp.int32))

    def update(
        updates: optax.Updates, state: GroupLRState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, GroupLRState]:
        del params
        lrs = {g: s(state.count) for g, s in schedules.items()}
        out = {n: (-lrs[labels[n]] * u).astype(u.dtype) for n, u in updates.items()}
        return out, GroupLRState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: TrainConfig, shapes: Mapping[str, tuple[int, ...]]
) -> optax.GradientTransformation:
    """AdamW over the trainable parameters `shapes` (`{name: shape}`): clip by the global norm
    of all their gradients, Adam, decoupled weight decay on matrices, then each group's
    schedule. Moments take the parameters' dtype, the first `optim.mu_dtype` when set."""
    o = cfg.optim
    labels = {name: group_of(name) for name in shapes}
    mask = {name: decays(name, len(shape)) for name, shape in shapes.items()}
    schedules = {g: schedule(cfg, peak_lr(cfg, g)) for g in set(labels.values())}
    return optax.chain(
        *([optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm > 0 else []),
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=o.mu_dtype),
        optax.add_decayed_weights(o.weight_decay, mask=mask),
        scale_by_group_lr(schedules, labels),
    )
