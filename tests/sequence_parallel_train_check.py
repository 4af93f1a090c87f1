"""Runs the tiny config's train step with the tokens sharded over the `sequence` axis and on
one device, over the same global batches, and writes each step's loss and gradient norm
(`test_sequence_parallel.py` runs this in a subprocess with 8 CPU devices):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python tests/sequence_parallel_train_check.py OUT.json MESH [MESH ...]

Each mesh runs on as many devices as its sizes multiply to (e.g. `data=2,sequence=2`: 4).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import jax
from train_mesh_check import ROWS, batches, run

from nsa_jax.train import sharding
from nsa_jax.train.batch import model_batch
from nsa_jax.train.config import load_config
from nsa_jax.train.step import Trainer

jax.config.update("jax_default_matmul_precision", "highest")


def main(out: str, specs: list[str]) -> None:
    # one hybrid decoder layer (Hq=4, Hkv=2: Ulysses up to sequence=2) and one vision block
    base = load_config("tiny", ["optim.lr=1e-2", "optim.warmup=0", "steps=10",
                                "model.text.num_hidden_layers=1", "model.vision.depth=1",
                                "model.vision.fullatt_block_indexes=0"])
    raws = batches(base)
    result: dict = {}
    for spec in ["", *specs]:
        size = math.prod(int(item.split("=")[1]) for item in spec.split(",") if item)
        mesh = sharding.make_mesh(spec, jax.devices()[:size])
        cfg = dataclasses.replace(base, mesh=spec,
                                  per_shard_batch=ROWS // sharding.batch_shards(mesh))
        trainer = Trainer.build(cfg, mesh)
        state = trainer.init_state()
        batch = trainer.put_batch(model_batch(raws[0], cfg.model))
        _, records = run(trainer, state, raws)
        result[spec or "1"] = {"records": records,
                               "input_ids": str(batch.input_ids.sharding.spec)}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
