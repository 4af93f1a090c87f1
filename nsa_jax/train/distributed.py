"""Several processes, one run: `jax.distributed` for multi-host training.

A run is multi-process when the environment says so; `initialize()` then starts JAX's
distributed runtime before anything touches a device, so that `jax.devices()` lists every
chip of every host and one mesh spans them:

- `JAX_NUM_PROCESSES` > 1, with `JAX_PROCESS_ID` and `JAX_COORDINATOR_ADDRESS` (`host:port` of
  process 0): any cluster, and the 2-process CPU test on one machine;
- `NSA_JAX_DISTRIBUTED=1` (what `tpu/run.sh` sets on every worker of a pod slice): JAX finds
  the cluster itself (Cloud TPU metadata, SLURM, Kubernetes, Open MPI);
- `NSA_JAX_DISTRIBUTED=0` forces a single process.

Each process then reads its own slice of the data (`data.pipeline.make_dataset`'s
`ShardByJaxProcess`), feeds its own devices' rows of each global batch
(`Trainer.put_batch`), writes its own shards of every checkpoint (orbax), and only process 0
writes metrics, TensorBoard files and the progress bar.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping

import jax
import numpy as np

ENV_SWITCH = "NSA_JAX_DISTRIBUTED"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise ValueError(f"a multi-process run needs {key} (JAX_NUM_PROCESSES is set)") from None
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Starts `jax.distributed` when the environment asks for several processes (see the
    module docstring); returns whether it did. Call it before any device is used.

    Raises:
      ValueError: an incomplete or inconsistent environment (names the variable).
    """
    env = os.environ if env is None else env
    switch = env.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "off", "no"):
        return False
    if "JAX_NUM_PROCESSES" in env:
        n = _int(env, "JAX_NUM_PROCESSES")
        if n < 1:
            raise ValueError(f"JAX_NUM_PROCESSES={n} must be >= 1")
        if n == 1:
            return False
        pid = _int(env, "JAX_PROCESS_ID")
        if not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} is not in [0, {n})")
        address = env.get("JAX_COORDINATOR_ADDRESS")
        if not address:
            raise ValueError("a multi-process run needs JAX_COORDINATOR_ADDRESS (host:port of "
                             "process 0)")
        jax.distributed.initialize(coordinator_address=address, num_processes=n,
                                   process_id=pid)
        return True
    if switch in ("1", "true", "on", "yes", "auto"):
        jax.distributed.initialize()  # the cluster's own description (e.g. Cloud TPU)
        return True
    if switch:
        raise ValueError(f"{ENV_SWITCH}={env[ENV_SWITCH]!r}: use 1 (find the cluster) or 0")
    return False


def is_main() -> bool:
    """Whether this is process 0, the one that logs and writes metrics."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def every_host(n: int) -> list[int]:
    """`n` of every process, in process order (one all-gather; `[n]` on one host)."""
    if jax.process_count() == 1:
        return [n]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.int64(n))).reshape(-1).tolist()


def global_sum(*counts: int) -> tuple[int, ...]:
    """Each count summed over every process (each host counts its own rows' tokens)."""
    if jax.process_count() == 1:
        return counts
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.asarray(counts, np.int64)))
    return tuple(int(x) for x in every.sum(axis=0))


def sum_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Named counts summed over every process (each host may name different keys): the
    hosts exchange their counts as JSON (two all-gathers; none on one host)."""
    if jax.process_count() == 1:
        return dict(counts)
    from jax.experimental import multihost_utils

    mine = np.frombuffer(json.dumps(dict(counts)).encode(), np.uint8)
    width = max(every_host(mine.size))
    padded = np.zeros(width, np.uint8)
    padded[: mine.size] = mine
    total: collections.Counter[str] = collections.Counter()
    for row in np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, width):
        total.update(json.loads(row.tobytes().rstrip(b"\0").decode()))
    return dict(total)
