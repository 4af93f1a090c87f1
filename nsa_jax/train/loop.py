"""The training loop: data, state (fresh or resumed), steps, eval, checkpoints, metrics.

`train(cfg, out)` runs `cfg.steps` optimiser steps, resuming from `OUT/checkpoints`' newest
step that restores when there is one (a damaged newer one is reported and kept aside). Each
step draws `grad_accum` batches from the grain iterator, so a checkpoint's iterator state is
exactly the data consumed by its steps, and a resumed run sees the batches the interrupted
one would have seen next. SIGTERM or SIGINT ends the run after the step in flight, saved
(`preempt.py`).
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
from tqdm.contrib.logging import logging_redirect_tqdm

from nsa_jax.data import synthetic
from nsa_jax.data.pipeline import make_dataset, pipeline_stats
from nsa_jax.data.processor import rope_index_for
from nsa_jax.data.tokenizer import build_qwen_tokenizer, load_tokenizer
from nsa_jax.train import distributed, sharding
from nsa_jax.train.batch import host_batches
from nsa_jax.train.checkpoint import CheckpointError, Checkpoints, is_finite_state
from nsa_jax.train.config import SyntheticData, TrainConfig, dump_config
from nsa_jax.train.flops import batch_train_flops, peak_flops
from nsa_jax.train.metrics import MetricsLog
from nsa_jax.train.preempt import Preempted, StopSignals, signalled_on_any_host
from nsa_jax.train.step import Trainer, TrainState

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps in a row)."""


def tokenizer_for(cfg: TrainConfig, out: str) -> tokenizers.Tokenizer:
    """`cfg.tokenizer`; else the `init_from` checkpoint's `tokenizer.json` (an HF directory's,
    our model's `hf_extra/`, a training run's); else the run's own copy; else Qwen2.5-VL's
    vocabulary built offline. Whichever it is, it is kept as `OUT/tokenizer.json`: the run is
    then a checkpoint that `nsa-jax export` and every `--ckpt` read with its tokenizer, and a
    resumed run need not build it again."""
    from nsa_jax.ckpt import resolve_ckpt

    kept = os.path.join(out, "tokenizer.json")
    # a resumed run no longer needs init_from's directory: it may be gone (its copy is kept)
    present = cfg.init_from is not None and os.path.isdir(cfg.init_from)
    of_init = resolve_ckpt(cfg.init_from, "init_from").tokenizer_dir if present else None
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    elif of_init is not None and os.path.isfile(os.path.join(of_init, "tokenizer.json")):
        tok = load_tokenizer(of_init)
    elif os.path.isfile(kept):
        return load_tokenizer(kept)
    else:
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
            video = spec.video()
            for split, n, s in (("train", spec.train_videos, seed),
                                ("eval", spec.eval_videos, seed + 1)):
                synthetic.write_dataset(os.path.join(tmp, split), task=spec.task,
                                        num_videos=n, cfg=video, seed=s)
            os.replace(tmp, root)  # complete or absent
        distributed.barrier("synthetic data")
    return os.path.join(root, names[0]), os.path.join(root, names[1])


class CompiledTogether:
    """Several processes: a step program is compiled by every process before any runs it.

    A program with collectives between processes must start on every process at about the
    same time the first time it runs: XLA:CPU's gloo collectives (the multi-process CPU test)
    connect a group of devices on the first collective that uses it, and every process must
    arrive within 30 s (a fixed deadline, which the XLA collective timeouts do not change),
    or the step fails in all of them. Left to itself, each process compiles a program on its
    first call, on its own; one loaded host may finish compiling the step half a minute after
    another. So `__call__` compiles a program for arguments of a new shape ahead of the call
    (`jax.jit(...).lower(...).compile()`, which the call then reuses) and waits for every
    process at a barrier. One process: nothing to do.
    """

    def __init__(self) -> None:
        self._ready: set[Any] = set()

    def __call__(self, name: str, fn: Any, *args: Any) -> None:
        if jax.process_count() == 1:
            return
        leaves, tree = jax.tree.flatten(args)
        key = (name, tree, tuple((np.shape(x), np.result_type(x).str) for x in leaves))
        if key in self._ready:
            return
        fn.lower(*args).compile()
        distributed.barrier(f"compiled {name}")
        self._ready.add(key)


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
    # each process reads its own records, dealt in blocks of its rows per micro-batch: with
    # one sample per row, the global batches are those of one process reading everything
    train = make_dataset(list(train_ann), tok, data, shard_block=data.batch_size,
                         rope_index_fn=rope)
    held_out = None
    if cfg.eval_every and eval_ann:
        held_out = make_dataset(list(eval_ann), tok,
                                dataclasses.replace(data, shuffle=False, num_epochs=1),
                                rope_index_fn=rope)
    return train, held_out


def initial_params(cfg: TrainConfig) -> dict[str, np.ndarray] | None:
    """The `init_from` checkpoint's parameters (host arrays, our flat layout; an HF or exported
    model's missing NSA gates initialised as VideoNSA does), or None for a random init.
    `init_from` takes what `--ckpt` takes: a training run (its latest step) goes on from there
    with a fresh optimiser and data order."""
    if cfg.init_from is None:
        return None
    from nsa_jax.ckpt import read_params, resolve_ckpt

    return read_params(resolve_ckpt(cfg.init_from, "init_from"), cfg.model)[1]


def evaluate(trainer: Trainer, state: TrainState, dataset: grain.IterDataset,
             cfg: TrainConfig, compiled: CompiledTogether | None = None) -> float:
    """Mean cross-entropy per answer token over the first `eval_batches` held-out batches
    (of every process: the counts are summed over hosts, as the loss is), fewer where a
    host's held-out shard ends first (all hosts stop together)."""
    compiled = compiled or CompiledTogether()
    total, tokens = 0.0, 0
    batches = iter(dataset)
    for _ in range(cfg.eval_batches):
        raw = next(batches, None)
        # every host stops at the first batch one of them lacks: the step is collective
        if min(distributed.every_host(int(raw is not None))) == 0:
            break
        (batch,) = host_batches([raw], cfg.model)
        tokens += batch.answer_tokens
        device_batch = trainer.put_batch(batch)
        args = (state.params, state.frozen, device_batch)
        compiled("eval_loss", trainer.eval_loss, *args)
        total += float(trainer.eval_loss(*args))
    (tokens,) = distributed.global_sum(tokens)
    return total / tokens if tokens else math.nan


def train(cfg: TrainConfig, out: str, *, resume: bool = True,
          resume_from: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) `cfg` with its outputs in `out`; returns the last step's record.

    A resumed run starts from the newest step that restores (`Checkpoints.restore_newest`:
    damaged newer ones are reported and kept aside), or from `resume_from`. SIGTERM and
    SIGINT end the run after the step in flight, with a checkpoint of it
    (`nsa_jax.train.preempt`).

    Raises:
      CheckpointError: `out` holds checkpoints of another config (or `resume` is False and
        it holds any), none of its steps restores, or it has no step `resume_from`.
      TrainingStopped: `max_bad_steps` non-finite steps in a row.
      Preempted: a signal stopped the run; its last step is saved.
    """
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    global_batch = cfg.per_shard_batch * sharding.batch_shards(mesh)
    ckpt = Checkpoints(out, cfg)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise CheckpointError(f"{ckpt.directory} holds checkpoints (latest step {latest}); "
                              "resume, or choose a new --out")
    if resume_from is not None and latest is None:
        raise CheckpointError(f"--resume-from {resume_from}: {ckpt.directory} holds no "
                              "checkpoint")
    # checked before the data and the model are built
    steps = ckpt.resume_steps(global_batch, resume_from) if latest is not None else []
    # log lines (a skipped sample's) go above the progress bar, not through it
    with StopSignals() as stops, logging_redirect_tqdm():
        trainer = Trainer.build(cfg, mesh)
        train_ds, eval_ds = datasets(cfg, out, global_batch)
        # under the mesh, the Pallas kernels run per shard (`nsa_jax.attention.partition`)
        with jax.set_mesh(mesh):
            return _run(cfg, out, mesh, trainer, ckpt, steps, train_ds, eval_ds, global_batch,
                        stops)


def _run(cfg: TrainConfig, out: str, mesh: jax.sharding.Mesh, trainer: Trainer,
         ckpt: Checkpoints, steps: list[int], train_ds: grain.IterDataset,
         eval_ds: grain.IterDataset | None, global_batch: int,
         stops: StopSignals) -> dict[str, Any]:
    main = jax.process_index() == 0
    data_it = iter(train_ds)
    if steps:
        state, step, reports = ckpt.restore_newest(steps, trainer.abstract_state(), data_it,
                                                   global_batch=global_batch)
        for line in reports if main else ():
            print(line, file=sys.stderr)
        log.info("resumed from %s/%d", ckpt.directory, step)
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
    compiled = CompiledTogether()
    stopped = 0
    if main:
        tqdm.write(f"nsa-jax train: {cfg.name}, mesh {dict(mesh.shape)}, {global_batch} rows x "
                   f"{cfg.grad_accum} micro-batches per step, "
                   + (f"resumed at step {start}" if steps else "from scratch"),
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
            # every host stops at the same step when any one's data runs out
            if min(distributed.every_host(len(raws))) < cfg.grad_accum:
                if main:
                    tqdm.write(f"the training data ran out at step {int(state.step)}",
                               file=sys.stderr)
                break
            state, record = _step(trainer, state, raws, cfg, t0, peak, compiled)
            record.update(skipped_samples(data_it))
            step = record["step"]
            # a signal during the last step changes nothing: the run ends and saves anyway
            stopped = signalled_on_any_host(stops) if step < cfg.steps else 0
            if (not stopped and cfg.eval_every and eval_ds is not None
                    and step % cfg.eval_every == 0):
                record["eval_loss"] = evaluate(trainer, state, eval_ds, cfg, compiled)
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if record["bad_in_row"] >= cfg.max_bad_steps:
                raise TrainingStopped(
                    f"{record['bad_in_row']} steps in a row with a non-finite loss or gradient "
                    f"(last at step {step}); the last checkpoint in {ckpt.directory} is intact"
                )
            if stopped or step % cfg.save_every == 0 or step == cfg.steps:
                _save(ckpt, state, data_it, global_batch, record.get("eval_loss"))
                saved = step
            if stopped:
                break
        if int(state.step) > saved:  # the data ran out before the last step
            _save(ckpt, state, data_it, global_batch, None)
            saved = int(state.step)
        ckpt.wait()
    finally:
        bar.close()
        metrics.close()
        ckpt.close()
    if stopped:
        raise Preempted(stopped, saved, ckpt.directory)
    return record


def skipped_samples(data_it: grain.DatasetIterator) -> dict[str, Any]:
    """The samples the pipeline skipped so far (a resumed run's count goes on from its
    checkpoint), summed over hosts: `skipped_samples` in all, `skipped_by_reason` by cause
    (the exception's name, e.g. FileNotFoundError, InvalidDataError, OverBudget)."""
    by_reason = distributed.sum_counts(pipeline_stats(data_it)["skipped_by_reason"])
    return {"skipped_samples": sum(by_reason.values()),
            "skipped_by_reason": dict(sorted(by_reason.items()))}


def summary(record: dict[str, Any]) -> str:
    """The run's last line: its step, loss and skipped samples (by cause), e.g. `done: step
    8, loss 11.3724, 3 samples skipped (FileNotFoundError 2, InvalidDataError 1)`."""
    line = f"done: step {record['step']}"
    if record.get("loss") is not None:
        line += f", loss {record['loss']:.4f}"
    if record.get("skipped_samples"):
        n = record["skipped_samples"]
        causes = ", ".join(f"{k} {v}" for k, v in record["skipped_by_reason"].items())
        line += f", {n} sample{'s' if n != 1 else ''} skipped ({causes})"
    return line


def _step(trainer: Trainer, state: TrainState, raws: list[dict[str, np.ndarray]],
          cfg: TrainConfig, t0: float, peak: float | None,
          compiled: CompiledTogether) -> tuple[TrainState, dict[str, Any]]:
    acc = trainer.zero_grads()
    loss_sum = jnp.zeros((), jnp.float32)
    answer, tokens, flops = 0, 0, 0.0
    for raw, batch in zip(raws, host_batches(raws, cfg.model), strict=True):
        answer += batch.answer_tokens
        tokens += int((raw["segment_ids"] > 0).sum())
        flops += batch_train_flops(cfg.model, raw, batch.answer_tokens)
        device_batch = trainer.put_batch(batch)
        compiled("accumulate", trainer.accumulate, state, acc, device_batch)
        acc, loss = trainer.accumulate(state, acc, device_batch)
        loss_sum = loss_sum + loss
    # the loss and gradient sums cover every host's rows: so must their normaliser (which
    # every process passes to `apply` as the same replicated value)
    answer, tokens = distributed.global_sum(answer, tokens)
    n_tokens = jnp.float32(answer)
    compiled("apply", trainer.apply, state, acc, n_tokens, loss_sum)
    state, m = trainer.apply(state, acc, n_tokens, loss_sum)
    m = jax.device_get(m)
    dt = time.perf_counter() - t0
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
