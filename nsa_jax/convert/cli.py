"""`nsa-jax convert`: Hugging Face checkpoint directories <-> our orbax checkpoints."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from nsa_jax.config import PRESETS

if TYPE_CHECKING:
    from nsa_jax.ckpt import ModelSource
    from nsa_jax.config import ModelConfig
    from nsa_jax.convert.lazy import LazyArray
    from nsa_jax.convert.source import HFSource

DESCRIPTION = """\
Converts checkpoints in both directions. Tensors keep their stored dtype, so
HF -> ours -> HF gives back every tensor bit for bit, under the published file
names, keys and config.json. Both directions stream: one tensor is read,
converted and written at a time, so the memory needed is about twice the largest
tensor (1.5 GB in all for the 3B model in bf16), whatever the model's size.

  hf-to-jax  --hf DIR --out CKPT [--preset NAME]
      DIR: a Hugging Face Qwen2.5-VL or VideoNSA directory (config.json plus
      model.safetensors, or shards listed by model.safetensors.index.json; either
      key layout: visual.* / model.layers.* / lm_head.*, or model.visual.* /
      model.language_model.*). Architectures Qwen2_5_VLForConditionalGeneration,
      VideoNSAForConditionalGeneration and DonerightForConditionalGeneration (the
      name VideoNSA's training script saves). NSA is on when config.json has an
      "nsa" key or a VideoNSA architecture, or when the tensors carry VideoNSA's
      gates (model.layers.N.self_attn.g_proj_1/2.*; a warning says so for a
      Qwen2_5_VL config); without an "nsa" key the setting is VideoNSA's released
      one, with block_counts / window_size read from config.json when present.
      --preset NAME (a model preset, listed in `hf-to-jax --help` and
      docs/model.md) takes the NSA setting and rope index of that preset
      instead; its sizes must match config.json's.
      CKPT gets config.json, params/ (orbax), hf_extra/ (tokenizer and processor
      files found in DIR) and hf_source/ (DIR's config.json, index and file
      layout, to write it back as found).

  jax-to-hf  --ckpt CKPT --out DIR [--max-shard-gb GB]
      CKPT: a training run (nsa-jax train --out; its latest step), one of its
      steps (RUN/checkpoints/N), our exported model, or a Hugging Face directory.
      Writes safetensors, index and config.json that transformers loads, plus the
      tokenizer and processor files CKPT carried. A checkpoint converted from HF
      comes back in its source's files, key layout and config.json (merged with
      any change of config); otherwise, or with --max-shard-gb, as shards
      model-0000i-of-0000N.safetensors of at most GB GiB (default 5) with
      model.safetensors.index.json, in the source's key layout (the official
      older one without a source). transformers'
      Qwen2_5_VLForConditionalGeneration.from_pretrained(DIR) loads a plain
      Qwen2.5-VL result with no missing or unexpected keys. A model with NSA keeps
      VideoNSA's names for the gate weights, declares a VideoNSA architecture and
      writes block_counts and window_size (read by VideoNSA's code) beside our
      "nsa" key.

Everything is checked before anything is written, and nothing is written when a
check fails: every safetensors file's header against its length (an empty or
truncated shard), the index against its shards, every tensor's name, count,
shape and dtype against config.json (e.g. an edited intermediate_size or
num_hidden_layers), a missing shard, index, config.json or params/ directory.
Each failure is one line naming the file and the tensor, with exit status 1.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints: Hugging Face <-> orbax (hf-to-jax, jax-to-hf)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h = sub.add_parser(
        "hf-to-jax",
        help="Hugging Face directory -> our orbax checkpoint",
        description="Reads a Hugging Face Qwen2.5-VL / VideoNSA directory tensor by tensor "
        "and writes our orbax checkpoint (config.json, params/, hf_extra/, hf_source/).",
    )
    h.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    h.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint directory")
    h.add_argument(
        "--preset",
        metavar="NAME",
        choices=sorted(PRESETS),
        help="use this preset's NSA setting and rope index (its sizes must match config.json's): "
        + ", ".join(sorted(PRESETS)),
    )
    h.set_defaults(func=_hf_to_jax)
    j = sub.add_parser(
        "jax-to-hf",
        help="our orbax checkpoint -> Hugging Face directory",
        description="Writes a checkpoint as safetensors + index + config.json (+ the "
        "tokenizer/processor files it carried) that transformers loads: in the files, keys and "
        "config.json of the Hugging Face directory it was converted from, else sharded in the "
        "official layout. Every tensor is checked against config.json first.",
    )
    j.add_argument(
        "--ckpt",
        required=True,
        metavar="CKPT",
        help="a training run (its latest step), a step, our exported model or a "
        "Hugging Face directory",
    )
    j.add_argument("--out", required=True, metavar="DIR", help="new Hugging Face directory")
    j.add_argument(
        "--max-shard-gb",
        type=float,
        default=None,
        help="reshard to at most this many GiB a shard (default: the source's files; else 5, "
        "as the official checkpoints)",
    )
    j.set_defaults(func=_jax_to_hf)


def _refuse_nonempty(path: str) -> None:
    # orbax and our writers would mix old and new files; never overwrite silently
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path} already exists and is not an empty directory")


def _hf_to_jax(args: argparse.Namespace) -> int:
    from nsa_jax.convert.checkpoint import save_checkpoint
    from nsa_jax.convert.hf import inspect_hf

    def run() -> None:
        _refuse_nonempty(args.out)
        checked = inspect_hf(args.hf, preset_name=args.preset)
        save_checkpoint(
            args.out, checked.cfg, checked.params, extra_from=args.hf, source=checked.source
        )
        print(f"wrote {len(checked.params)} tensors ({checked.cfg.architecture}) to {args.out}")

    return _report_errors(run)


def _jax_to_hf(args: argparse.Namespace) -> int:
    from nsa_jax.ckpt import resolve_ckpt
    from nsa_jax.convert.hf import write_hf

    def run() -> None:
        if args.max_shard_gb is not None and not args.max_shard_gb > 0:
            raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
        model = resolve_ckpt(args.ckpt)
        _refuse_nonempty(args.out)
        cfg, params, source = _checked_params(model)
        extra = model.tokenizer_dir
        files = write_hf(
            args.out,
            cfg,
            params,
            max_shard_bytes=None if args.max_shard_gb is None else int(args.max_shard_gb * 2**30),
            extra_dir=extra if os.path.isdir(extra) else None,
            source=source,
        )
        print(f"wrote {len(params)} tensors in {len(files)} file(s) to {args.out}")

    return _report_errors(run)


def _checked_params(
    model: ModelSource,
) -> tuple[ModelConfig, dict[str, LazyArray], HFSource | None]:
    """The config and lazy parameters of a resolved `--ckpt`, checked against each other
    before anything is written, with the HF source record to write back as found (that of
    a converted checkpoint, or the HF directory's own)."""
    from nsa_jax.ckpt import lazy_params
    from nsa_jax.convert.checkpoint import inspect_checkpoint
    from nsa_jax.convert.hf import check_params, inspect_hf

    if model.kind == "hf":
        checked = inspect_hf(model.model_dir)
        return checked.cfg, checked.params, checked.source
    if model.kind == "model":
        return inspect_checkpoint(model.model_dir)
    cfg, params = lazy_params(model)
    check_params(cfg, params, model.model_dir, f"the config of {model.describe()}")
    return cfg, params, None


def _report_errors(run: Callable[[], None]) -> int:
    try:
        run()
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"nsa-jax convert: error: {e}", file=sys.stderr)
        return 1
    return 0
