"""Starts an asynchronous checkpoint save and kills its own process with SIGKILL `DELAY`
seconds later (`test_train_resume.py` checks what is left): `python tests/train_save_kill.py
DIR DELAY`. Step 1 is saved whole first; step 2 is the interrupted save. Every array of step
`s` holds the value `s`."""

from __future__ import annotations

import os
import signal
import sys
import time

import grain
import jax.numpy as jnp

from nsa_jax.train.checkpoint import Checkpoints
from nsa_jax.train.config import load_config
from nsa_jax.train.step import TrainState

SHAPE = (4096, 2048)  # 32 MiB of f32: a save that takes a while


def state_at(step: int) -> TrainState:
    def full(shape: tuple[int, ...]) -> jnp.ndarray:
        return jnp.full(shape, float(step), jnp.float32)

    return TrainState(step=jnp.int32(step), params={"w": full(SHAPE), "b": full((7,))},
                      frozen={}, opt_state={"m": full(SHAPE)}, skipped=jnp.int32(0),
                      bad_in_row=jnp.int32(0))


def main(directory: str, delay: float) -> None:
    ckpt = Checkpoints(directory, load_config("tiny"))
    data = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt.save(state_at(1), data, global_batch=2)
    ckpt.wait()
    next(data)
    ckpt.save(state_at(2), data, global_batch=2)
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
