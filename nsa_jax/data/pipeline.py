"""grain datasets over LLaVA-Video / ms-swift annotations: decode, tokenize, budget, pack, batch.

Graph (host side, NumPy):

    read_annotations  (fail fast on a malformed line: file and line in the error)
      -> MapDataset.source -> shuffle(seed) -> shard (ShardByJaxProcess) -> repeat
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
    rope_index_fn: RopeIndexFn | None = None,
) -> grain.IterDataset:
    """The training input pipeline as a grain `IterDataset` of batches (see `collate`).

    Args:
      annotations: annotation file path(s), or records already read with `read_annotations`.
      tokenizer: a Qwen2.5-VL tokenizer (`tokenizer.load_tokenizer`).
      cfg: a `DataConfig` (or a preset from `PRESETS`).
      shard: which slice this host reads; default `ShardByJaxProcess()` (one slice per JAX
        process, equal sizes).
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
    end = len(ds) - len(ds) % shard.shard_count if shard.drop_remainder else len(ds)
    ds = ds[shard.shard_index : end : shard.shard_count]  # disjoint, equal slices per host
    host_records = len(ds)
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    # repeat() reseeds the shuffle above for each epoch: a fresh order every pass.
    ds = ds.repeat(cfg.num_epochs) if cfg.num_epochs != 1 else ds
    ds = ds.map(Prepare(tokenizer, cfg, rope_index_fn))
    it = ds.to_iter_dataset()
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    it = CountSkipped(it, pass_size=host_records)
    it = Rows(it, cfg)
    return it.batch(cfg.batch_size, batch_fn=lambda rows: collate(rows, cfg))


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
