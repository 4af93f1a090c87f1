"""Train state, its sharded creation, and the compiled step functions.

Parameters are a flat dict `{our_path: array}` (the names of `convert/names.py`), split into
the trainable ones and the frozen groups. A step is one or more micro-batches, each
`accumulate`d into an f32 gradient sum (donated buffer), then one `apply`: the sums of the
per-token losses and gradients are divided by the step's number of answer tokens (so the loss
is the mean over every answer token of every micro-batch, shard and packed sample), clipped,
and fed to AdamW. A non-finite loss or gradient norm leaves the parameters and the optimiser
state as they were, counts the step as skipped and extends the run of bad steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nsa_jax.attention.sequence_parallel import SequenceParallel
from nsa_jax.config import ModelConfig
from nsa_jax.model import scopes, stacking
from nsa_jax.model.vlm import Qwen25VL
from nsa_jax.train import sharding
from nsa_jax.train.batch import ModelBatch
from nsa_jax.train.config import TrainConfig
from nsa_jax.train.loss import chunked_cross_entropy, gather_positions
from nsa_jax.train.optim import is_frozen, make_optimizer, peak_lr, schedule

Array = jax.Array
Params = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes (all arrays; saved whole in a checkpoint).

    Attributes:
      step: int32 `[]` optimiser steps taken (skipped ones included).
      params: trainable parameters `{name: array}` in `param_dtype`.
      frozen: parameters of frozen groups.
      opt_state: optax state of `params`.
      skipped: int32 `[]` steps skipped for a non-finite loss or gradient.
      bad_in_row: int32 `[]` consecutive skipped steps up to now.
    """

    step: Array
    params: Params
    frozen: Params
    opt_state: Any
    skipped: Array
    bad_in_row: Array


jax.tree_util.register_dataclass(
    TrainState,
    data_fields=["step", "params", "frozen", "opt_state", "skipped", "bad_in_row"],
    meta_fields=[],
)


def leaf_name(path: tuple[Any, ...]) -> str:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if keys[-1] == "value":  # nnx.Variable's value
        keys = keys[:-1]
    return ".".join(str(k) for k in keys)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """The static structure of the model: merge a flat parameter dict back into a module.

    Attributes:
      graphdef: NNX graph definition (built with the compute dtype).
      treedef: the parameter state's tree structure; names: its leaves' flat names in order
        (decoder layers stacked with `scan_layers`: `model/stacking.py`).
      shapes: `{name: (shape, dtype)}` of the parameters at `param_dtype`.
      layer_names: the leaves' names in order in the per-layer layout (the model without
        `scan_layers`), which fixes each leaf's random draw (`init_params`); None: `names`.
    """

    graphdef: Any
    treedef: Any
    names: tuple[str, ...]
    shapes: Mapping[str, jax.ShapeDtypeStruct]
    layer_names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, cfg: ModelConfig, compute_dtype: Any, param_dtype: Any) -> ModelDef:
        abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, dtype=compute_dtype, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("the model holds non-parameter state; the train state has no room")
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = tuple(leaf_name(p) for p, _ in leaves)
        shapes = {n: jax.ShapeDtypeStruct(x.shape, param_dtype)
                  for n, (_, x) in zip(names, leaves, strict=True)}
        layer_names = None
        if cfg.scan_layers:
            layer_names = cls.of(cfg.replace(scan_layers=False), compute_dtype, param_dtype).names
        return cls(graphdef, treedef, names, shapes, layer_names)

    def merge(self, params: Mapping[str, Array]) -> Qwen25VL:
        state = jax.tree.unflatten(self.treedef, [params[n] for n in self.names])
        return nnx.merge(self.graphdef, state)


#: How each kind of parameter (the last part of its name) starts: the initialisers of the
#: model's constructors (`layers.linear`'s kernels and biases, `RMSNorm`, the token embedding).
#: `tests/test_train_init.py` holds the two equal.
INITIALIZERS: dict[str, jax.nn.initializers.Initializer] = {
    "kernel": jax.nn.initializers.normal(0.02),
    "embedding": jax.nn.initializers.normal(0.02),
    "bias": jax.nn.initializers.zeros,
    "weight": jax.nn.initializers.ones,
}


def init_params(md: ModelDef, seed: int,
                shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> Params:
    """Random parameters `{name: array}` at `md`'s shapes and dtypes, each created with its
    sharding (no full copy on one device): leaf `i` of the per-layer layout (`md.layer_names`)
    from `fold_in(key(seed), i)` with `INITIALIZERS[kind]`, so a stacked leaf holds the values
    its layers have unstacked.

    One small program per distinct (kind, shape, dtype, sharding), a few dozen at any depth:
    the model's constructor under one `jit` puts every leaf's random fill in one program,
    which compiles for minutes at the 3B and 7B shapes (~700 leaves)."""
    base = jax.random.key(seed)
    index = {n: i for i, n in enumerate(md.layer_names or md.names)}
    fills: dict[tuple[Any, ...], Callable[[Array], Array]] = {}
    out = {}
    for name in md.names:
        kind = name.rsplit(".", 1)[-1]
        if kind not in INITIALIZERS:
            raise ValueError(f"parameter {name!r}: no initialiser for {kind!r} leaves; add "
                             "one to nsa_jax.train.step.INITIALIZERS")
        shape, dtype = md.shapes[name].shape, md.shapes[name].dtype
        where = None if shardings is None else shardings[name]
        layers = stacking.stacked_run(name)
        fill = fills.get((kind, shape, dtype, where, layers is None))
        if fill is None:
            def one(j: Array, init: Any = INITIALIZERS[kind],
                    shape: tuple[int, ...] = shape[1:] if layers else shape,
                    dtype: Any = dtype) -> Array:
                return init(jax.random.fold_in(base, j), shape, dtype)

            fill = jax.jit(one if layers is None else jax.vmap(one), out_shardings=where)
            fills[(kind, shape, dtype, where, layers is None)] = fill
        if layers is None:
            out[name] = fill(np.int32(index[name]))
        else:
            rest = layers[1]
            out[name] = fill(np.asarray([index[f"language.layers.{i}.{rest}"]
                                         for i in layers[0]], np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled functions of one run on one mesh.

    Build with `Trainer.build(cfg, mesh)`; then `init_state()` or `abstract_state()` (for a
    restore), and per step: `zero_grads()`, `accumulate(...)` per micro-batch, `apply(...)`.
    `eval_loss(params, frozen, batch)` is the loss without gradients, from the parameters
    alone (a caller may hold no optimiser state: a forward pass at inference-time memory).
    """

    cfg: TrainConfig
    mesh: Mesh
    model_def: ModelDef
    tx: optax.GradientTransformation
    state_shardings: TrainState
    accumulate: Callable[..., tuple[Params, Array]]
    apply: Callable[..., tuple[TrainState, dict[str, Array]]]
    eval_loss: Callable[..., Array]
    zero_grads: Callable[[], Params]

    @classmethod
    def build(cls, cfg: TrainConfig, mesh: Mesh,
              wrap: Callable[[Callable], Callable] = lambda fn: fn) -> Trainer:
        """`wrap` is applied to each step function before `jax.jit` (the tests count their
        traces with it: one per batch bucket, never one per step)."""
        compute = jnp.dtype(cfg.compute_dtype)
        md = ModelDef.of(cfg.model, compute, jnp.dtype(cfg.param_dtype))
        trainable = {n: s.shape for n, s in md.shapes.items() if not is_frozen(cfg, n)}
        if not trainable:
            raise ValueError("every parameter group is frozen: nothing to train")
        tx = make_optimizer(cfg, trainable)
        p_sh = sharding.param_shardings({n: s.shape for n, s in md.shapes.items()}, mesh)
        rep = sharding.replicated(mesh)
        abstract_params = dict(md.shapes)
        train_sh = {n: p_sh[n] for n in trainable}
        frozen_sh = {n: p_sh[n] for n in md.shapes if n not in trainable}
        opt_abstract = jax.eval_shape(tx.init, {n: abstract_params[n] for n in trainable})
        state_sh = TrainState(
            step=rep, params=train_sh, frozen=frozen_sh,
            opt_state=_opt_shardings(opt_abstract, train_sh, rep),
            skipped=rep, bad_in_row=rep,
        )
        sp = SequenceParallel.of(mesh)
        if sp is not None:  # fail at build, naming the mesh and the heads, not mid-trace
            t = cfg.model.text
            sp.head_degree(t.num_attention_heads, t.num_key_value_heads)
        loss_fn = _loss_fn(md, cfg, compute, mesh)

        def accumulate(state: TrainState, acc: Params, batch: ModelBatch) -> tuple[Params, Array]:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, state.frozen, batch)
            acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
            return acc, loss

        def apply(state: TrainState, acc: Params, n_tokens: Array,
                  loss_sum: Array) -> tuple[TrainState, dict[str, Array]]:
            grads = jax.tree.map(lambda g: g / n_tokens, acc)
            loss = loss_sum / n_tokens
            grad_norm = optax.global_norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            cast = {n: g.astype(state.params[n].dtype) for n, g in grads.items()}
            updates, opt_state = tx.update(cast, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)

            def pick(new: Any, old: Any) -> Any:
                return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

            applied = state.step - state.skipped
            new = TrainState(
                step=state.step + 1,
                params=pick(params, state.params),
                frozen=state.frozen,
                opt_state=pick(opt_state, state.opt_state),
                skipped=state.skipped + (~ok).astype(jnp.int32),
                bad_in_row=jnp.where(ok, 0, state.bad_in_row + 1).astype(jnp.int32),
            )
            metrics = {
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": schedule(cfg, peak_lr(cfg, "language"))(applied),
                "skipped_steps": new.skipped,
                "bad_in_row": new.bad_in_row,
            }
            return new, metrics

        def zeros() -> Params:
            return {n: jnp.zeros(abstract_params[n].shape, jnp.float32) for n in trainable}

        return cls(
            cfg=cfg,
            mesh=mesh,
            model_def=md,
            tx=tx,
            state_shardings=state_sh,
            accumulate=jax.jit(wrap(accumulate), in_shardings=(state_sh, train_sh, None),
                               out_shardings=(train_sh, rep), donate_argnums=(1,)),
            apply=jax.jit(wrap(apply), in_shardings=(state_sh, train_sh, rep, rep),
                          out_shardings=(state_sh, rep), donate_argnums=(0,)),
            eval_loss=jax.jit(wrap(loss_fn), in_shardings=(train_sh, frozen_sh, None),
                              out_shardings=rep),
            zero_grads=jax.jit(wrap(zeros), out_shardings=train_sh),
        )

    def split(self, params: Mapping[str, Array]) -> tuple[Params, Params]:
        """`{name: array}` over every parameter -> (trainable, frozen)."""
        train = {n: params[n] for n in self.state_shardings.params}
        frozen = {n: params[n] for n in self.state_shardings.frozen}
        return train, frozen

    def init_state(self, params: Mapping[str, Array] | None = None) -> TrainState:
        """A fresh state: random parameters (`cfg.seed`) created sharded, or the given ones
        (e.g. a loaded checkpoint's, host arrays, either layout of the decoder layers) put
        onto the mesh in the model's layout."""
        md = self.model_def
        p_sh = {**self.state_shardings.params, **self.state_shardings.frozen}
        if params is None:
            params = init_params(md, self.cfg.seed, p_sh)
        else:
            params = stacking.in_layout(self.cfg.model, params)
            missing = sorted(set(md.names) - set(params))
            if missing:
                raise ValueError(f"parameters missing: {missing[:5]}")
            params = {n: jax.device_put(np.asarray(params[n], md.shapes[n].dtype), p_sh[n])
                      for n in md.names}
        train, frozen = self.split(params)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(train)
        rep = sharding.replicated(self.mesh)

        def zero() -> Array:  # one buffer each: the state is donated to the step
            return jax.device_put(jnp.zeros((), jnp.int32), rep)

        return TrainState(step=zero(), params=train, frozen=frozen, opt_state=opt_state,
                          skipped=zero(), bad_in_row=zero())

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and this mesh's shardings of the state (an orbax restore target)."""
        md = self.model_def
        train, frozen = self.split(md.shapes)
        opt = jax.eval_shape(self.tx.init, train)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        abstract = TrainState(step=scalar, params=train, frozen=frozen, opt_state=opt,
                              skipped=scalar, bad_in_row=scalar)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract, self.state_shardings,
        )

    def put_batch(self, batch: ModelBatch) -> ModelBatch:
        """Host batch -> global arrays sharded over (`data`, `fsdp`) on the leading axis and,
        for the token arrays and the patch slots, over `sequence` on the token axis (so the
        vision tower, the MLPs and the loss run on token shards)."""
        def put(path: tuple[Any, ...], x: Any) -> Array:
            x = np.asarray(x)
            sh = batch_leaf_sharding(self.mesh, path, x.shape)
            return jax.make_array_from_process_local_data(sh, x)

        return jax.tree_util.tree_map_with_path(put, batch)


# the batch arrays laid out by token: flat name -> the dimension of its tokens, sharded over
# `nsa_jax.axes.TOKEN_AXIS` (the rest shard by batch only)
TOKEN_DIMS = {"input_ids": 1, "segment_ids": 1, "position_ids": 2, "videos.pixels": 1}


def batch_leaf_sharding(mesh: Mesh, path: tuple[Any, ...], shape: tuple[int, ...]
                        ) -> NamedSharding:
    """The sharding of the `ModelBatch` leaf at `path` (a `tree_map_with_path` path) of
    global `shape`: rows over (`data`, `fsdp`) and, for `TOKEN_DIMS`, tokens over
    `sequence`. `put_batch` and the abstract batch of `tpu_compile` share it, so a compiled
    program sees the layout a run gives it."""
    axis = TOKEN_DIMS.get(leaf_name(path))
    return (sharding.batch_sharding(mesh, len(shape)) if axis is None
            else sharding.token_sharding(mesh, shape, axis))


def _opt_shardings(opt_abstract: Any, param_sh: Params, rep: NamedSharding) -> Any:
    """A parameter's sharding for every optimiser leaf stored under that parameter's name
    (Adam's moments), replicated for the rest (step counts)."""

    def pick(path: tuple[Any, ...], _: Any) -> NamedSharding:
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in param_sh:
                return param_sh[name]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def _loss_fn(
    md: ModelDef, cfg: TrainConfig, compute: Any, mesh: Mesh
) -> Callable[[Params, Params, ModelBatch], Array]:
    """Sum of the answer tokens' cross-entropies of one micro-batch."""
    t = cfg.model.text
    vocab_sh = NamedSharding(
        mesh, sharding.logical_to_spec((None, "vocab"), (t.hidden_size, t.vocab_size), mesh)
    )
    sp = SequenceParallel.of(mesh)

    def loss_fn(params: Params, frozen: Params, batch: ModelBatch) -> Array:
        full = {n: x.astype(compute) for n, x in {**params, **frozen}.items()}
        model = md.merge(full)
        h = model.forward(
            batch.input_ids, batch.position_ids, batch.segment_ids, videos=batch.videos,
            text_rows=batch.text_rows, return_hidden=True, sequence_parallel=sp,
        )
        with jax.named_scope(scopes.LOSS):  # by part in a step profile (train/profile.py)
            # gathered once per step, not once per loss chunk
            w = jax.lax.with_sharding_constraint(model.output_kernel(), vocab_sh)
            hk = gather_positions(h, batch.loss_positions, sp)
            return chunked_cross_entropy(hk, w, batch.loss_targets, batch.loss_weights,
                                         cfg.loss_chunk)

    return loss_fn
