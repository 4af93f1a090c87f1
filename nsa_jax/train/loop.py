"""The training loop: data, state (fresh or resumed), steps, eval, checkpoints, metrics.

`train(cfg, out)` runs `cfg.steps` optimiser steps, resuming from `OUT/checkpoints`' latest
step when there is one. Each step draws `grad_accum` batches from the grain iterator, so a
checkpoint's iterator state is exactly the data consumed by its steps, and a resumed run sees
the batches the interrupted one would have seen next.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tqdm import tqdm

from nsa_jax.data import synthetic
from nsa_jax.data.pipeline import make_dataset
from nsa_jax.data.processor import rope_index_for
from nsa_jax.data.tokenizer import build_qwen_tokenizer, load_tokenizer
from nsa_jax.train import sharding
from nsa_jax.train.batch import model_batch
from nsa_jax.train.checkpoint import CheckpointError, Checkpoints, is_finite_state
from nsa_jax.train.config import SyntheticData, TrainConfig, dump_config
from nsa_jax.train.flops import batch_train_flops, peak_flops
from nsa_jax.train.metrics import MetricsLog
from nsa_jax.train.step import Trainer, TrainState

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps in a row)."""


def tokenizer_for(cfg: TrainConfig, out: str) -> tokenizers.Tokenizer:
    """`cfg.tokenizer`; else the `init_from` checkpoint's `tokenizer.json` (HF directory or our
    `hf_extra/`); else Qwen2.5-VL's vocabulary built offline, kept as `OUT/tokenizer.json` so
    that a resumed run loads it instead of building it again."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.init_from:
        for sub in ("", "hf_extra"):
            if os.path.isfile(os.path.join(cfg.init_from, sub, "tokenizer.json")):
                return load_tokenizer(os.path.join(cfg.init_from, sub))
    kept = os.path.join(out, "tokenizer.json")
    if os.path.isfile(kept):
        return load_tokenizer(kept)
    tok = build_qwen_tokenizer()
    if jax.process_index() == 0:
        tok.save(kept + ".tmp")
        os.replace(kept + ".tmp", kept)
    return tok


def write_synthetic(out: str, spec: SyntheticData, seed: int) -> tuple[str, str]:
    """Generates (once) the synthetic train and eval splits under `OUT/synthetic/`;
    returns their annotation files (videos beside them)."""
    root = os.path.join(out, "synthetic")
    names = (f"train/{spec.task}.jsonl", f"eval/{spec.task}.jsonl")
    if not os.path.isdir(root):
        if jax.process_index() == 0:
            tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=out)
            video = synthetic.SyntheticConfig(
                num_frames=spec.num_frames, height=spec.height, width=spec.width, fps=spec.fps,
                event_frames=spec.event_frames, event_size=spec.event_size,
                max_count=spec.max_count)
            for split, n, s in (("train", spec.train_videos, seed),
                                ("eval", spec.eval_videos, seed + 1)):
                synthetic.write_dataset(os.path.join(tmp, split), task=spec.task,
                                        num_videos=n, cfg=video, seed=s)
            os.replace(tmp, root)  # complete or absent
        _barrier("synthetic data")
    return os.path.join(root, names[0]), os.path.join(root, names[1])


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def datasets(cfg: TrainConfig, out: str, global_batch: int) -> tuple[grain.IterDataset,
                                                                     grain.IterDataset | None]:
    """The train dataset (this process's rows of each global micro-batch) and the held-out
    one (None without eval)."""
    if cfg.synthetic is not None:
        train_file, eval_file = write_synthetic(out, cfg.synthetic, cfg.seed)
        train_ann, eval_ann = (train_file,), (eval_file,)
        roots = (os.path.dirname(train_file), os.path.dirname(eval_file))
    else:
        train_ann, eval_ann, roots = cfg.annotations, cfg.eval_annotations, ()
    if not train_ann:
        raise ValueError(f"config {cfg.name}: no training data; set annotations=FILE[,FILE] "
                         "(and data.video_roots=DIR) or synthetic.task=needle")
    if global_batch % jax.process_count():
        raise ValueError(f"{global_batch} rows per micro-batch do not split over "
                         f"{jax.process_count()} processes")
    data = dataclasses.replace(cfg.data, batch_size=global_batch // jax.process_count(),
                               video_roots=tuple(cfg.data.video_roots) + roots)
    tok = tokenizer_for(cfg, out)
    rope = rope_index_for(cfg.model)
    train = make_dataset(list(train_ann), tok, data, rope_index_fn=rope)
    held_out = None
    if cfg.eval_every and eval_ann:
        held_out = make_dataset(list(eval_ann), tok,
                                dataclasses.replace(data, shuffle=False, num_epochs=1),
                                rope_index_fn=rope)
    return train, held_out


def initial_params(cfg: TrainConfig) -> dict[str, np.ndarray] | None:
    """The `init_from` checkpoint's parameters (host arrays, our flat layout; its missing NSA
    gates initialised as VideoNSA does), or None for a random init."""
    if cfg.init_from is None:
        return None
    from nsa_jax.convert.load import load_params

    return load_params(cfg.init_from, cfg.model)[1]


def evaluate(trainer: Trainer, state: TrainState, dataset: grain.IterDataset,
             cfg: TrainConfig) -> float:
    """Mean cross-entropy per answer token over the first `eval_batches` held-out batches."""
    total, tokens = 0.0, 0
    for i, raw in enumerate(iter(dataset)):
        if i == cfg.eval_batches:
            break
        batch = model_batch(raw, cfg.model)
        tokens += batch.answer_tokens
        total += float(trainer.eval_loss(state, trainer.put_batch(batch)))
    return total / tokens if tokens else math.nan


def train(cfg: TrainConfig, out: str, *, resume: bool = True) -> dict[str, Any]:
    """Runs (or resumes) `cfg` with its outputs in `out`; returns the last step's record.

    Raises:
      CheckpointError: `out` holds checkpoints of another config (or `resume` is False and
        it holds any).
      TrainingStopped: `max_bad_steps` non-finite steps in a row.
    """
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    main = jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh)
    global_batch = cfg.per_shard_batch * sharding.batch_shards(mesh)
    ckpt = Checkpoints(out, cfg)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise CheckpointError(f"{ckpt.directory} holds checkpoints (latest step {latest}); "
                              "resume, or choose a new --out")
    if latest is not None:
        ckpt.check(latest, global_batch)  # before the data and the model are built
    trainer = Trainer.build(cfg, mesh)
    train_ds, eval_ds = datasets(cfg, out, global_batch)
    data_it = iter(train_ds)
    if latest is not None:
        state = ckpt.restore(latest, trainer.abstract_state(), data_it,
                             global_batch=global_batch)
        log.info("resumed from %s/%d", ckpt.directory, latest)
    else:
        state = trainer.init_state(initial_params(cfg))
    start = int(state.step)
    if main:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(dump_config(cfg))
    metrics = MetricsLog(out, enabled=main, tensorboard=cfg.tensorboard, resume_step=start)
    peak = peak_flops(jax.devices()[0].device_kind, cfg.peak_tflops)
    bar = tqdm(total=cfg.steps, initial=start, disable=not main, unit="step",
               dynamic_ncols=True)
    record: dict[str, Any] = {"step": start}
    saved = start
    if main:
        tqdm.write(f"nsa-jax train: {cfg.name}, mesh {dict(mesh.shape)}, {global_batch} rows x "
                   f"{cfg.grad_accum} micro-batches per step, "
                   + (f"resumed at step {start}" if latest is not None else "from scratch"),
                   file=sys.stderr)
    try:
        for _ in range(start, cfg.steps):
            t0 = time.perf_counter()
            raws = []
            for _ in range(cfg.grad_accum):
                try:
                    raws.append(next(data_it))
                except StopIteration:
                    break
            if len(raws) < cfg.grad_accum:
                tqdm.write(f"the training data ran out at step {int(state.step)}",
                           file=sys.stderr)
                break
            state, record = _step(trainer, state, raws, cfg, t0, peak)
            step = record["step"]
            if cfg.eval_every and eval_ds is not None and step % cfg.eval_every == 0:
                record["eval_loss"] = evaluate(trainer, state, eval_ds, cfg)
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if record["bad_in_row"] >= cfg.max_bad_steps:
                raise TrainingStopped(
                    f"{record['bad_in_row']} steps in a row with a non-finite loss or gradient "
                    f"(last at step {step}); the last checkpoint in {ckpt.directory} is intact"
                )
            if step % cfg.save_every == 0 or step == cfg.steps:
                _save(ckpt, state, data_it, global_batch, record.get("eval_loss"))
                saved = step
        if int(state.step) > saved:  # the data ran out before the last step
            _save(ckpt, state, data_it, global_batch, None)
        ckpt.wait()
    finally:
        bar.close()
        metrics.close()
        ckpt.close()
    return record


def _step(trainer: Trainer, state: TrainState, raws: list[dict[str, np.ndarray]],
          cfg: TrainConfig, t0: float, peak: float | None) -> tuple[TrainState, dict[str, Any]]:
    acc = trainer.zero_grads()
    loss_sum = jnp.zeros((), jnp.float32)
    answer, tokens, flops = 0, 0, 0.0
    for raw in raws:
        batch = model_batch(raw, cfg.model)
        answer += batch.answer_tokens
        tokens += int((raw["segment_ids"] > 0).sum())
        flops += batch_train_flops(cfg.model, raw, batch.answer_tokens)
        acc, loss = trainer.accumulate(state, acc, trainer.put_batch(batch))
        loss_sum = loss_sum + loss
    state, m = trainer.apply(state, acc, jnp.float32(answer), loss_sum)
    m = jax.device_get(m)
    dt = time.perf_counter() - t0
    # this process's rows; every process has as many
    tokens *= jax.process_count()
    record = {
        "step": int(state.step),
        "loss": float(m["loss"]),
        "lr": float(m["lr"]),
        "grad_norm": float(m["grad_norm"]),
        "tokens_per_s": tokens / dt,
        "skipped_steps": int(m["skipped_steps"]),
        "bad_in_row": int(m["bad_in_row"]),
        "tokens": tokens,
        "answer_tokens": answer,
        "step_time_s": dt,
        "mfu": None if peak is None else flops / (dt * jax.local_device_count() * peak),
    }
    return state, record


def _save(ckpt: Checkpoints, state: TrainState, data_it: grain.DatasetIterator,
          global_batch: int, eval_loss: float | None) -> None:
    if not is_finite_state(state):
        raise TrainingStopped(f"non-finite parameters at step {int(state.step)}: not saved")
    ckpt.save(state, data_it, global_batch=global_batch, eval_loss=eval_loss)
