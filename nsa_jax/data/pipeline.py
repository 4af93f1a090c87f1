"""grain datasets over LLaVA-Video / ms-swift annotations: decode, tokenize, budget, pack, batch.

Graph (host side, NumPy):

    read_annotations  (fail fast on a malformed line: file and line in the error)
      -> MapDataset.source -> shuffle(seed) -> shard (ShardByJaxProcess, in blocks) -> repeat
      -> map(Prepare): probe video, plan frames within the token budget, decode, patchify,
                       tokenize; a bad video becomes a `Skipped` record instead of an error
      -> to_iter_dataset -> mp_prefetch (decode worker processes)
      -> CountSkipped   (main process: log path + reason, count, drop; counts in the state)
      -> Rows           (one sample per row, or greedy packing aligned to 64-token blocks)
      -> batch(collate) (pad to the smallest bucket length: a few static shapes for jit)

The stages live beside this assembly: `config.py` (DataConfig, PRESETS), `annotations.py`
(read_annotations), `stages.py` (Prepare, CountSkipped, Rows) and `collate.py` (collate).

Every stage is a grain iterator, so `iterator.get_state()` / `set_state()` (and orbax via
`grain.checkpoint.CheckpointSave/Restore`) resume exactly where a run stopped.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

import grain
import tokenizers

from nsa_jax.data.annotations import read_annotations
from nsa_jax.data.collate import collate
from nsa_jax.data.config import PRESETS, DataConfig
from nsa_jax.data.processor import RopeIndexFn
from nsa_jax.data.stages import CountSkipped, CountSkippedIterator, Prepare, Rows


def make_dataset(
    annotations: str | os.PathLike | Sequence[str | os.PathLike] | list[dict],
    tokenizer: tokenizers.Tokenizer,
    cfg: DataConfig = PRESETS["default"],
    *,
    shard: grain.sharding.ShardOptions | None = None,
    shard_block: int = 1,
    rope_index_fn: RopeIndexFn | None = None,
) -> grain.IterDataset:
    """The training input pipeline as a grain `IterDataset` of batches (see `collate`).

    Args:
      annotations: annotation file path(s), or records already read with `read_annotations`.
      tokenizer: a Qwen2.5-VL tokenizer (`tokenizer.load_tokenizer`).
      cfg: a `DataConfig` (or a preset from `PRESETS`).
      shard: which slice this host reads; default `ShardByJaxProcess()` (one slice per JAX
        process, equal sizes).
      shard_block: the shuffled records are dealt to the shards in blocks of this many
        (shard `i` of `n` takes the `i`-th block of every `n * shard_block` records). With the
        rows of one micro-batch per host as the block, one sample per row and nothing skipped,
        the hosts' batches put together are, row for row, the batches one process reading
        everything would make: a run's data does not depend on how many hosts read it.
      rope_index_fn: adds `position_ids`: `processor.rope_index_for(model_cfg)` for the model.

    `iter(ds)` gives a checkpointable iterator; `pipeline_stats(iterator)` reports the samples
    read and the videos skipped.
    """
    if isinstance(annotations, list) and (not annotations or isinstance(annotations[0], dict)):
        records = annotations
    else:
        records = read_annotations(annotations)
    if not records:
        raise ValueError("make_dataset: no annotation records")
    shard = shard if shard is not None else grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = grain.MapDataset.source(records)
    # the same shuffle on every host (same seed), then disjoint blocks per host
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = BlockShard(ds, shard.shard_index, shard.shard_count, shard_block,
                    drop_remainder=shard.drop_remainder)
    host_records = len(ds)
    # repeat() reseeds the shuffle above for each epoch: a fresh order every pass.
    ds = ds.repeat(cfg.num_epochs) if cfg.num_epochs != 1 else ds
    ds = ds.map(Prepare(tokenizer, cfg, rope_index_fn))
    it = ds.to_iter_dataset()
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers),
                            worker_init_fn=ignore_ctrl_c)
    it = CountSkipped(it, pass_size=host_records)
    it = Rows(it, cfg)
    return it.batch(cfg.batch_size, batch_fn=lambda rows: collate(rows, cfg))


class BlockShard(grain.MapDataset):
    """Shard `index` of `count` of `parent`, dealt in blocks of `block` records: from every
    `count * block` consecutive records, the `index`-th block (`block=1`: a strided slice).
    With `drop_remainder` and several shards, the records past the last whole round are
    dropped so that every shard has as many; otherwise (and always for one shard, which has
    no peer to keep even with) the last round is dealt as far as it goes.

    An index past the end reads the parent's next epoch, as grain's own slices do, so that a
    `repeat()` after it reshuffles the parent every epoch.
    """

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int = 1, *,
                 drop_remainder: bool = True) -> None:
        super().__init__(parent)
        if not 0 <= index < count or block < 1:
            raise ValueError(f"BlockShard: shard {index} of {count} in blocks of {block}")
        self._index, self._count, self._block = index, count, block
        self._parent_length = len(parent)
        whole, rest = divmod(self._parent_length, count * block)
        extra = 0 if drop_remainder and count > 1 else min(max(rest - index * block, 0), block)
        self._length = whole * block + extra

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        epoch, i = divmod(index, self._length)
        round_, offset = divmod(i, self._block)
        return (epoch * self._parent_length
                + (round_ * self._count + self._index) * self._block + offset)

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - grain's MapDataset signature
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"BlockShard(index={self._index}, count={self._count}, block={self._block})"


def ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """Run in each decode worker: Ctrl-C in a terminal reaches every process of the group,
    but the training process alone decides how to stop (`nsa_jax.train.preempt`: finish the
    step and save), then closes its workers; a worker ended by the key would fail the next
    batch first. SIGTERM stays: grain stops its workers with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which only `absl.app.run` parses; our CLI and
    pytest are not absl programs, so the defaults are taken as parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pipeline_stats(iterator: grain.DatasetIterator) -> dict[str, Any]:
    """Samples read and videos skipped (by reason) so far, from the iterator tree."""
    todo = [iterator]
    while todo:
        it = todo.pop()
        if isinstance(it, CountSkippedIterator):
            return it.stats
        todo.extend(getattr(it, "_parents", ()))
    raise ValueError("pipeline_stats: not an iterator of make_dataset()")
