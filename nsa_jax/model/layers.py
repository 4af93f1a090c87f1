"""Small building blocks shared by the vision tower and the language model.

Norms compute in f32 and cast back, as transformers' `Qwen2RMSNorm` does (normalise in f32,
cast to the input dtype, then scale by the weight).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """`weight * (x / rms(x))` over the last axis, statistics in f32."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def activation(name: str, x: Array) -> Array:
    """The transformers activations Qwen2.5-VL uses."""
    if name == "silu":
        return jax.nn.silu(x)
    if name in ("gelu", "gelu_exact"):
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}")


class RMSNorm(nnx.Module):
    """RMSNorm with a `weight` parameter (the HF name)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype = jnp.float32) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.weight[...], self.eps)


def linear(
    din: int, dout: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs, std: float = 0.02
) -> nnx.Linear:
    """`nnx.Linear` with kernel `[din, dout]` (the transpose of the HF weight), N(0, std) init."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


class GatedMLP(nnx.Module):
    """SwiGLU MLP: `down(act(gate(x)) * up(x))`; outputs tagged for remat policies (`mlpwi`
    for gate and up, `mlpwo` for down)."""

    def __init__(
        self, dim: int, hidden: int, act: str, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs
    ) -> None:
        self.gate_proj = linear(dim, hidden, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = linear(dim, hidden, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = linear(hidden, dim, bias=bias, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: Array) -> Array:
        gate = checkpoint_name(self.gate_proj(x), "mlpwi")
        up = checkpoint_name(self.up_proj(x), "mlpwi")
        return checkpoint_name(self.down_proj(activation(self.act, gate) * up), "mlpwo")


def same_runs(keys: Sequence[Hashable]) -> list[range]:
    """Maximal runs of consecutive equal `keys`: `[a, a, b, a] -> [0:2], [2:3], [3:4]`."""
    runs: list[range] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            runs.append(range(start, i))
            start = i
    return runs


def scan_modules(
    modules: Sequence[nnx.Module],
    x: Any,
    step: Callable[[nnx.Module, Any], Any],
    policy: Callable[..., bool] | None = None,
) -> Any:
    """`x` through `step(module, x)` for each of `modules` (one structure) in order, as one
    `lax.scan` over their stacked states (`scan_stacked`). The parameters stay one module
    each; the stack is a transient copy made per call (the decoder layers are stored stacked
    instead, `model/stacking.py`)."""
    graphdef, stacked = nnx.split(stack_modules(modules))
    return scan_stacked(graphdef, stacked, x, step, policy)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the structure of `modules` whose every leaf is theirs stacked `[n, ...]`
    in order."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(m) for m in modules))
    return nnx.merge(nnx.graphdef(modules[0]), stacked)


def scan_stacked(
    graphdef: nnx.GraphDef,
    stacked: nnx.State,
    x: Any,
    step: Callable[[nnx.Module, Any], Any],
    policy: Callable[..., bool] | None = None,
) -> Any:
    """`x` through `step(module_i, x)` for `i` along the leading axis of `stacked` (the state
    of modules of one `graphdef`, each leaf `[n, ...]`), as one `lax.scan`: the body is traced
    and compiled once however many modules there are, and each step reads its slice of the
    stacked leaves (their gradients come out stacked). With `policy` (a
    `jax.checkpoint_policies` entry) each step is rematerialised under it."""

    def body(h: Any, state: nnx.State) -> Any:
        return step(nnx.merge(graphdef, state), h)

    if policy is not None:
        body = jax.checkpoint(body, policy=policy)
    return jax.lax.scan(lambda h, state: (body(h, state), None), x, stacked)[0]


def checkpointed(module: Any, step: Callable[..., Any], *args: Any,
                 policy: Callable[..., bool] | None = None) -> Any:
    """`step(module, *args)` rematerialised in the backward pass (under `policy`, a
    `jax.checkpoint_policies` entry; None saves nothing), as a pure function of the module's
    state: the checkpoint traces modules of its own, so it also runs under `jax.vmap` and
    other transforms of the caller (where `nnx.remat` would write the caller's variables
    from the inner trace). `module` may be a module or a sequence of them (`nnx.List`)."""
    graphdef, state = nnx.split(module)
    return jax.checkpoint(lambda s, *a: step(nnx.merge(graphdef, s), *a), policy=policy)(
        state, *args)
