"""Compiles the tiny config's `Trainer.accumulate` on 4 CPU devices for the meshes given and
writes each program's per-device memory (`memory_analysis()`) and the shardings of its state,
as JSON: `python sequence_memory_check.py OUT LENGTH MESH...` (run by
`test_sequence_memory.py`; the device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp

from nsa_jax.train import sharding
from nsa_jax.train.config import load_config
from nsa_jax.train.loss import answer_bucket
from nsa_jax.train.step import Trainer
from nsa_jax.train.tpu_compile import batch_spec

# the 7B configs' memory settings: layers and vision blocks scanned and recomputed
MEMORY = ["model.remat=true", "model.scan_layers=true", "model.vision_remat=tower",
          "per_shard_batch=1"]


def compile_memory(mesh_spec: str, length: int) -> dict:
    cfg = load_config("tiny", [*MEMORY, f"mesh={mesh_spec}"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices())
    rows = cfg.per_shard_batch * sharding.batch_shards(mesh)
    batch = batch_spec(cfg, rows, length, answer_bucket(64, length), mesh)
    with jax.set_mesh(mesh):
        trainer = Trainer.build(cfg, mesh)
        state = trainer.abstract_state()
        sums = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                           sharding=x.sharding), state.params)
        compiled = trainer.accumulate.lower(state, sums, batch).compile()
    m = compiled.memory_analysis()
    kernel = state.params["language.layers.0:2.mlp.up_proj.kernel"]  # scanned: stacked
    return {"rows": rows, "temporaries": int(m.temp_size_in_bytes),
            "arguments": int(m.argument_size_in_bytes),
            "up_proj_spec": str(kernel.sharding.spec),
            "pixels_spec": str(batch.videos.pixels.sharding.spec)}


def main() -> None:
    out, length, *meshes = sys.argv[1:]
    result = {m: compile_memory(m, int(length)) for m in meshes}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
