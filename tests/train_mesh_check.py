"""Runs the tiny config's train step on several meshes of 8 CPU devices and writes what the
test compares (`test_train_step.py` runs this in a subprocess, since the device count is fixed
when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python tests/train_mesh_check.py OUT.json CKPT_DIR MESH[,MESH...]

with mesh names from `MESHES` (one device is always run too); each mesh takes as many devices
as its axes multiply to (`sequence=2`: the tokens over 2 devices).

Records, per mesh, each step's loss and gradient norm over the same global batches and the
sharding of the batch's tokens (each step function traced at most once per batch bucket,
`chex.assert_max_traces`, or the run fails); on one device, gradient accumulation's loss
and a NaN step's effect; and a state saved on the first mesh named, restored onto the last
(onto one device if only one is named), stepping on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.train import sharding
from nsa_jax.train.batch import model_batch, synthetic_batch
from nsa_jax.train.checkpoint import Checkpoints
from nsa_jax.train.config import load_config
from nsa_jax.train.step import Trainer

jax.config.update("jax_default_matmul_precision", "highest")

ROWS, LENGTH, STEPS = 8, 128, 3
MESHES = {"1": "", "8x1": "data=8", "2x4": "data=2,fsdp=4", "1x8": "fsdp=8",
          "sequence=2": "sequence=2"}


def bucket_count(cfg, raws: list) -> int:
    """The distinct batch shapes among `raws` (length, answer slots, text-row slots, vision
    layouts: `train/batch.py`'s buckets), i.e. how many programs a step function may need."""
    def key(raw: dict) -> tuple:
        b = model_batch(raw, cfg.model)
        return jax.tree.structure(b), tuple((np.shape(x), np.asarray(x).dtype.name)
                                            for x in jax.tree.leaves(b))

    return len({key(r) for r in raws})


def traced_at_most(buckets: int):
    """`Trainer.build`'s `wrap`: the step functions of a batch traced once per bucket, the
    others once. `chex.assert_max_traces` counts by the wrapped function's source, so every
    trainer built here shares the counts: they are cleared before each mesh's steps, and a
    retrace by an earlier trainer, later, overflows the last one's."""
    def wrap(fn):
        return chex.assert_max_traces(fn, n=buckets if fn.__name__ in ("accumulate", "loss_fn")
                                      else 1)
    return wrap


def batches(cfg) -> list:
    return [synthetic_batch(cfg.model, ROWS, LENGTH, answer_tokens=4 + s, frame_patches=(4, 4),
                            seed=s) for s in range(STEPS)]


def run(trainer: Trainer, state, raws: list, accum: int = 1):
    """Steps over `raws`, `accum` consecutive batches per step; returns (state, records)."""
    records = []
    for i in range(0, len(raws), accum):
        acc = trainer.zero_grads()
        loss_sum = jnp.zeros((), jnp.float32)
        tokens = 0
        for raw in raws[i : i + accum]:
            batch = model_batch(raw, trainer.cfg.model)
            tokens += batch.answer_tokens
            acc, loss = trainer.accumulate(state, acc, trainer.put_batch(batch))
            loss_sum = loss_sum + loss
        state, m = trainer.apply(state, acc, jnp.float32(tokens), loss_sum)
        records.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, records


def main(out: str, ckpt_dir: str, names: list[str]) -> None:
    # one hybrid decoder layer and one vision block: every kind of parameter, half the compile
    base = load_config("tiny", ["optim.lr=1e-2", "optim.warmup=0", "steps=10",
                                "model.text.num_hidden_layers=1", "model.vision.depth=1",
                                "model.vision.fullatt_block_indexes=0"])
    raws = batches(base)
    # two micro-batches with different answer-token counts, and a NaN in the input (below)
    few = dict(raws[0], labels=np.where(np.arange(ROWS)[:, None] < 2, raws[0]["labels"], -100))
    poisoned = dict(raws[0], pixel_values_videos=np.full_like(raws[0]["pixel_values_videos"],
                                                              np.nan))
    buckets = bucket_count(base, [*raws, few, poisoned])
    result: dict = {"meshes": {}, "input_ids": {}, "buckets": buckets}
    trainers = {}
    for name in ["1", *names]:
        spec = MESHES[name]
        size = math.prod(int(item.split("=")[1]) for item in spec.split(",") if item)
        mesh = sharding.make_mesh(spec, jax.devices()[:size])
        cfg = dataclasses.replace(base, mesh=spec, per_shard_batch=ROWS // sharding.batch_shards(
            mesh))
        chex.clear_trace_counter()
        trainer = Trainer.build(cfg, mesh, wrap=traced_at_most(buckets))
        trainers[name] = trainer
        batch = trainer.put_batch(model_batch(raws[0], cfg.model))
        result["input_ids"][name] = str(batch.input_ids.sharding.spec)
        _, result["meshes"][name] = run(trainer, trainer.init_state(), raws)

    # two micro-batches with different answer-token counts: the step's loss is the mean over
    # all their answer tokens (`run` on each alone gives each one's mean at the same params)
    one = trainers["1"]
    alone = [run(one, one.init_state(), [b])[1][0] for b in (raws[0], few)]
    counts = [model_batch(b, one.cfg.model).answer_tokens for b in (raws[0], few)]
    result["accumulated"] = {
        "alone": alone, "counts": counts,
        "together": run(one, one.init_state(), [raws[0], few], accum=2)[1][0],
    }

    # a NaN in the input: the update is skipped and counted, the state is left as it was
    state = one.init_state()
    before = jax.device_get(state.params)
    state, nan_records = run(one, state, [poisoned, poisoned])
    after = jax.device_get(state.params)
    state, good = run(one, state, raws[:1])
    result["nan"] = {
        "records": nan_records + good,
        "params_unchanged": all(np.array_equal(before[k], after[k]) for k in before),
        "good_equals_fresh": good[0]["loss"] == result["meshes"]["1"][0]["loss"],
    }

    # saved on one mesh after two steps, restored onto another, one more step
    dst_name = names[-1] if len(names) > 1 else "1"
    src, dst = trainers[names[0]], trainers[dst_name]
    state, _ = run(src, src.init_state(), raws[:2])
    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt = Checkpoints(ckpt_dir, src.cfg)
    ckpt.save(state, it, global_batch=ROWS)
    ckpt.wait()
    restored = Checkpoints(ckpt_dir, dst.cfg).restore(
        2, dst.abstract_state(), iter(grain.MapDataset.range(4).to_iter_dataset()),
        global_batch=ROWS)
    leaf = restored.params["language.layers.0.mlp.up_proj.kernel"]
    result["restored"] = {
        "sharding_before": str(state.params["language.layers.0.mlp.up_proj.kernel"].sharding
                               .spec),
        "sharding": str(leaf.sharding.spec),
        "from": names[0], "to": dst_name,
        "step": int(restored.step),
        "records": run(dst, restored, raws[2:])[1],
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
