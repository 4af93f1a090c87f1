"""The device mesh's axis names and their roles: declared once, on the bottom floor of nsa_jax.

One `Mesh` has the axes `MESH_AXES`; each role names the mesh axes that split it:

- batch (`BATCH_AXES`): the rows of a batch, over `data` and `fsdp`;
- state (`STATE_AXES`): the parameters and the optimiser state (ZeRO-3), over `fsdp` and
  `sequence` together, as MaxText's rules put `embed` on ('fsdp', 'sequence', ...): a chip of a
  context-parallel mesh holds 1/(fsdp x sequence) of the state, not 1/fsdp;
- tokens (`TOKEN_AXIS`): the tokens of a sequence (context parallelism), over `sequence`;
- heads (`HEAD_AXIS`): attention heads and the other tensor-parallel dimensions, over `tensor`.

Training's sharding rules (`train/sharding.py`), the per-shard kernel calls
(`attention/partition.py`) and context parallelism (`attention/sequence_parallel.py`) read
these names from here, so a renamed axis is renamed for all of them. This module imports
nothing from nsa_jax.
"""

from __future__ import annotations

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
SEQUENCE = "sequence"

MESH_AXES = (DATA, FSDP, TENSOR, SEQUENCE)

BATCH_AXES = (DATA, FSDP)
STATE_AXES = (FSDP, SEQUENCE)
TOKEN_AXIS = SEQUENCE
HEAD_AXIS = TENSOR
