"""`nsa-jax convert`: Hugging Face checkpoint directories <-> our orbax checkpoints."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

DESCRIPTION = """\
Converts checkpoints in both directions. Tensors keep their stored dtype, so
HF -> ours -> HF gives back every tensor bit for bit. Both directions stream:
one tensor is read, converted and written at a time, so the memory needed is
about twice the largest tensor (1.5 GB in all for the 3B model in bf16),
whatever the model's size.

  hf-to-jax  --hf DIR --out CKPT
      DIR: a Hugging Face Qwen2.5-VL or VideoNSA directory (config.json plus
      model.safetensors, or shards listed by model.safetensors.index.json; either
      key layout: visual.* / model.layers.* / lm_head.*, or model.visual.* /
      model.language_model.*). CKPT gets config.json, params/ (orbax) and
      hf_extra/ (tokenizer and processor files found in DIR).

  jax-to-hf  --ckpt CKPT --out DIR
      CKPT: a training run (nsa-jax train --out; its latest step), one of its
      steps (RUN/checkpoints/N), our exported model, or a Hugging Face directory.
      Writes sharded safetensors (model-0000i-of-0000N.safetensors) with
      model.safetensors.index.json and config.json in the layout of the official
      Qwen2.5-VL checkpoints, plus the tokenizer and processor files CKPT carried.
      transformers' Qwen2_5_VLForConditionalGeneration.from_pretrained(DIR) loads a
      plain Qwen2.5-VL result with no missing or unexpected keys. A model with NSA
      keeps VideoNSA's names for the gate weights
      (model.layers.N.self_attn.g_proj_1/2.{weight,bias}) and declares
      "architectures": ["VideoNSAForConditionalGeneration"], as VideoNSA's
      checkpoint does; its NSA settings are stored under the "nsa" key of config.json.

Bad input (a missing shard, a missing or misshapen tensor, an unknown architecture)
stops with a message naming the file and the tensor.
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
        "and writes our orbax checkpoint (config.json, params/, hf_extra/).",
    )
    h.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    h.add_argument("--out", required=True, metavar="CKPT", help="new checkpoint directory")
    h.set_defaults(func=_hf_to_jax)
    j = sub.add_parser(
        "jax-to-hf",
        help="our orbax checkpoint -> Hugging Face directory",
        description="Writes our checkpoint as sharded safetensors + index + config.json "
        "(+ the tokenizer/processor files it carried) that transformers loads.",
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
        default=5.0,
        help="largest shard in GiB (default 5, as the official checkpoints)",
    )
    j.set_defaults(func=_jax_to_hf)


def _refuse_nonempty(path: str) -> None:
    # orbax and our writers would mix old and new files; never overwrite silently
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path} already exists and is not an empty directory")


def _hf_to_jax(args: argparse.Namespace) -> int:
    from nsa_jax.convert.checkpoint import save_checkpoint
    from nsa_jax.convert.hf import lazy_hf

    def run() -> None:
        _refuse_nonempty(args.out)
        cfg, params = lazy_hf(args.hf)
        save_checkpoint(args.out, cfg, params, extra_from=args.hf)
        print(f"wrote {len(params)} tensors ({cfg.architecture}) to {args.out}")

    return _report_errors(run)


def _jax_to_hf(args: argparse.Namespace) -> int:
    from nsa_jax.ckpt import lazy_params, resolve_ckpt
    from nsa_jax.convert.hf import write_hf

    def run() -> None:
        source = resolve_ckpt(args.ckpt)
        _refuse_nonempty(args.out)
        cfg, params = lazy_params(source)
        extra = source.tokenizer_dir
        files = write_hf(
            args.out,
            cfg,
            params,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            extra_dir=extra if os.path.isdir(extra) else None,
        )
        print(f"wrote {len(params)} tensors in {len(files)} shard(s) to {args.out}")

    return _report_errors(run)


def _report_errors(run: Callable[[], None]) -> int:
    from nsa_jax.convert.hf import CheckpointError

    try:
        run()
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"nsa-jax convert: error: {e}", file=sys.stderr)
        return 1
    return 0
