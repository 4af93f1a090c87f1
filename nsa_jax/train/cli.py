"""`nsa-jax train --config NAME_OR_YAML --out DIR [--steps N] [--save-every K] [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

DESCRIPTION = """\
Trains VideoNSA (or any model of nsa_jax.config) with AdamW on the grain pipeline,
sharded over a device mesh, with orbax checkpoints.

  --config NAME_OR_YAML  a shipped config (tiny, demo, videonsa-7b-36k, videonsa-7b-128k,
                         gpu-small) or a YAML file of config fields (`base: NAME` to
                         start from a shipped one)
  --out DIR              checkpoints/, metrics.jsonl, tensorboard/, config.yaml;
                         running again with the same DIR resumes from its newest
                         checkpoint that restores (the data continues where it
                         stopped); a damaged newer one is reported in one line and
                         kept aside as DIR/checkpoints/STEP.damaged
  key=value              overrides by dotted path, e.g. optim.lr=1e-5 mesh=data=2,fsdp=4
                         model.attention.nsa.window=512 annotations=a.jsonl,b.jsonl

Multi-host: start the same command on every host with JAX_NUM_PROCESSES,
JAX_PROCESS_ID and JAX_COORDINATOR_ADDRESS set (or NSA_JAX_DISTRIBUTED=1 on a Cloud
TPU slice, as tpu/run.sh does); DIR must be one directory every host sees.

SIGTERM or SIGINT (Ctrl-C): the step in flight finishes and is saved, one line says
where, and the command exits with 128 + the signal's number (143 for SIGTERM, 130 for
SIGINT); the same command resumes from that step. A second Ctrl-C stops at once (exit 130)
with the last periodic checkpoint as the latest.

Exits 1 with a message for a bad config, a checkpoint of another config in DIR,
or a run stopped by too many non-finite steps in a row. See docs/training.md.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train (or resume) a run: sharded step, AdamW, orbax checkpoints, metrics",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="NAME_OR_YAML")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--steps", type=int, metavar="N", help="optimiser steps of the whole run")
    p.add_argument("--save-every", type=int, metavar="K", help="checkpoint every K steps")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--no-resume", action="store_true",
                        help="refuse to start if DIR holds checkpoints (default: resume from "
                             "the newest that restores)")
    resume.add_argument("--resume-from", type=int, metavar="STEP",
                        help="resume from DIR's step STEP; newer steps are kept aside "
                             "(renamed STEP.newer-than-...)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from nsa_jax.train import distributed

    try:  # before anything touches a device
        distributed.initialize()
    except ValueError as e:
        print(f"nsa-jax train: {e}", file=sys.stderr)
        return 1
    from nsa_jax.train.checkpoint import CheckpointError
    from nsa_jax.train.config import load_config
    from nsa_jax.train.loop import TrainingStopped, summary, train
    from nsa_jax.train.preempt import Preempted, exit_status

    # process 0 logs; the others say only what goes wrong
    logging.basicConfig(level=logging.INFO if distributed.is_main() else logging.WARNING,
                        format="%(message)s")
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.save_every is not None:
        overrides.append(f"save_every={args.save_every}")
    try:
        cfg = load_config(args.config, overrides)
        record = train(cfg, args.out, resume=not args.no_resume, resume_from=args.resume_from)
    except (ValueError, CheckpointError, TrainingStopped) as e:
        print(f"nsa-jax train: {e}", file=sys.stderr)
        return 1
    except Preempted as e:
        if distributed.is_main():
            print(f"nsa-jax train: {e}", file=sys.stderr)
        return exit_status(e.signum)
    except KeyboardInterrupt:
        print("nsa-jax train: interrupted: stopped without saving the step in flight; "
              "the same command resumes from the last checkpoint", file=sys.stderr)
        return exit_status(signal.SIGINT)
    if distributed.is_main():
        print(summary(record))
    return 0
