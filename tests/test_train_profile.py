"""The step profile's breakdown (`nsa_jax.train.profile`): a traced program's ops bucketed by
the model's named scopes and phase, their matmul FLOPs counted from the compiled HLO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.model import scopes
from nsa_jax.train import profile, sharding

N = 256


def toy_step(x: jax.Array, w: jax.Array) -> jax.Array:
    """A tower and a 'language' part with an 'attention' inside, rematerialised together (as
    a decoder layer is), then a loss."""

    @jax.checkpoint
    def model(x: jax.Array) -> jax.Array:
        with jax.named_scope(scopes.VISION):
            h = jnp.tanh(x @ w)
        with jax.named_scope(scopes.LANGUAGE):
            h = h @ w.T
            with jax.named_scope(scopes.ATTENTION):
                return jax.nn.softmax(h @ h.T, axis=-1) @ h

    with jax.named_scope(scopes.LOSS):
        return jnp.sum(jnp.square(model(x)))


def test_a_traced_step_splits_into_its_parts_with_their_matmul_flops(tmp_path):
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.normal(size=(N, N)), jnp.float32) for _ in range(2))
    grad = jax.jit(jax.value_and_grad(toy_step, argnums=1))
    compiled = grad.lower(x, w).compile()
    ops = profile.parse_hlo(compiled.as_text())
    dots: dict[str, float] = {}  # matmuls by part, in units of one N x N x N matmul
    for o in ops.values():
        part = profile.part_of("jit_toy_step", o)
        dots[part] = dots.get(part, 0) + o.flops / (2 * N**3)
    # x @ w: forward, its gradient; h @ w.T: forward, 2 gradients; the attention: twice
    # forward, 3-4 times backward (XLA may sum h's two gradients of h @ h.T first); each
    # forward matmul once more when XLA keeps the recomputation apart from the forward
    assert (dots["vision_fwd"], dots["vision_bwd"]) == (1, 1)
    assert dots.get("vision_recompute", 0) in (0, 1)
    assert dots["lm_proj_mlp"] in (3, 4) and 5 <= dots["lm_attention"] <= 8
    assert dots.get("other", 0) == 0 and dots.get("loss", 0) == 0
    jax.block_until_ready(grad(x, w))
    with jax.profiler.trace(str(tmp_path)):
        jax.block_until_ready(grad(x, w))
    traced = profile.trace_ops(tmp_path)
    got = profile.step_breakdown(traced, {"toy_step": compiled.as_text()})
    assert got["ops"] > 0 and got["unmatched_ops"] == 0
    p = got["parts"]
    for part, n in ((k, n) for k, n in dots.items() if n):  # each op ran once
        assert p[part]["hlo_tflops"] * 1e12 == n * 2 * N**3, part
        assert p[part]["ms"] > 0 and p[part]["tflops_per_s"] > 0, part
    assert p["optimizer"]["ms"] == 0 and p["idle"]["ms"] >= 0
    busy = sum(v["ms"] for k, v in p.items() if k != "idle")
    assert abs(busy - sum(o.duration_ns for o in traced) / 1e6) < 1e-6 * max(busy, 1)
    profile.plot_breakdown(got, tmp_path / "split.png", "toy")
    assert (tmp_path / "split.png").stat().st_size > 0


def test_ops_go_to_their_parts_by_module_opcode_and_name_stack():
    def part(op_name: str, opcode: str = "fusion", module: str = "jit_accumulate") -> str:
        return profile.part_of(module, profile.HloOp(opcode, op_name, 0.0))

    remat = "jit(accumulate)/transpose(jvp(loss_fn))/vmap(vision)/checkpoint/rematted_computation"
    assert part(remat + "/dot_general") == "vision_recompute"
    assert part("jit(accumulate)/jvp(loss_fn)/vmap(vision)/dot_general") == "vision_fwd"
    assert part("jit(accumulate)/transpose(jvp(vision))/mul") == "vision_bwd"
    assert part("jit(accumulate)/while/body/language/attention/custom-call") == "lm_attention"
    assert part("jit(accumulate)/transpose(jvp(language))/dot_general") == "lm_proj_mlp"
    assert part("jit(accumulate)/loss/dot_general") == "loss"
    assert part("jit(accumulate)/jvp(loss_fn)/add") == "other"  # `loss_fn` is no scope
    assert part("jit(accumulate)/language/x", opcode="all-gather-start") == "collectives"
    assert part("jit(apply)/mul", module="jit_apply") == "optimizer"


def test_the_models_scopes_reach_its_train_step(rng):
    """The tiny model's loss and gradients (uncompiled HLO, no run): every part the profile
    names has matmuls in it, the vision tower's forward, backward and (rematerialised whole)
    recompute included."""
    from nsa_jax.train.batch import model_batch, synthetic_batch
    from nsa_jax.train.config import load_config
    from nsa_jax.train.step import Trainer

    cfg = load_config("tiny", ["model.remat=true", "model.vision_remat=tower"])
    trainer = Trainer.build(cfg, sharding.make_mesh("data=1"))
    raw = synthetic_batch(cfg.model, 1, 128, answer_tokens=4, frame_patches=(4, 4), seed=0)
    batch = trainer.put_batch(model_batch(raw, cfg.model))
    hlo = trainer.accumulate.lower(trainer.abstract_state(), jax.eval_shape(trainer.zero_grads),
                                   batch).as_text(dialect="hlo", debug_info=True)
    flops: dict[str, float] = {}
    for op in profile.parse_hlo(hlo).values():
        part = profile.part_of("jit_accumulate", op)
        flops[part] = flops.get(part, 0.0) + op.flops
    for part in ("vision_fwd", "vision_bwd", "vision_recompute", "lm_attention", "lm_proj_mlp",
                 "loss"):
        assert flops.get(part, 0) > 0, (part, flops)
