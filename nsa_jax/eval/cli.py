"""`nsa-jax generate` (ask a checkpoint about a video) and `nsa-jax eval` (score a benchmark)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from nsa_jax.eval.tasks import TASK_NAMES

if TYPE_CHECKING:  # the model side is imported only when a command runs
    from nsa_jax.eval.video_qa import VideoSampling

GENERATE_DESCRIPTION = """\
Answers a question about a video with a checkpoint (ours, or a Hugging Face
Qwen2.5-VL / VideoNSA directory), streaming the answer as it is generated.

The prompt is laid out as VideoNSA's evaluation did: system turn "You are a
helpful assistant.", then the video, then your text. The video is sampled at
--fps frames a second, at most --max-frames frames, each resized to at most
--max-pixels pixels (Qwen2.5-VL caps video frames at 602,112). Greedy decoding
unless --temperature > 0.
"""

EVAL_DESCRIPTION = f"""\
Scores a checkpoint on a benchmark, from the benchmark's own annotation file
(JSON array or JSONL of the records lmms-eval reads) and a directory of its
videos. Prompts, answer parsing and scores are those of lmms-eval's tasks in
VideoNSA's copy; decoding is greedy with each task's token budget.

tasks: {", ".join(TASK_NAMES)}

OUT gets results.json (task, overall score, per-category scores and counts,
failed videos, settings) and predictions.jsonl (one line per sample); the table
is printed. A video that cannot be decoded is reported and counted, and the run
goes on. See docs/usage.md for each task's fields.
"""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt",
        required=True,
        metavar="DIR",
        help="our checkpoint or a Hugging Face directory (with tokenizer.json)",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="parameter and activation dtype (default bfloat16)",
    )
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled a second (default 1)")
    p.add_argument(
        "--max-frames",
        type=int,
        default=32,
        help="at most this many frames (default 32, VideoNSA's wrapper)",
    )
    p.add_argument(
        "--min-pixels", type=int, default=200_704, help="least pixels a frame (default 200,704)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=1_605_632,
        help="most pixels a frame (default 1,605,632; video frames are capped at "
        "602,112 in any case)",
    )
    p.add_argument(
        "--second-per-grid-ts",
        default="1.0",
        metavar="S|auto",
        help="seconds per temporal patch given to the model: a number (default 1.0, "
        "as VideoNSA's wrapper) or 'auto' for the clip's own 2 / sampled fps",
    )
    p.add_argument("--system", default="You are a helpful assistant.", help="the system turn")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def register(subparsers: argparse._SubParsersAction) -> None:
    g = subparsers.add_parser(
        "generate",
        help="answer a question about a video, streaming the answer",
        description=GENERATE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(g)
    g.add_argument("--video", metavar="PATH", help="the video (omit for a text-only question)")
    g.add_argument("--prompt", required=True, help="the question")
    g.add_argument("--max-new-tokens", type=int, default=512, help="default 512")
    add_decoding_args(g)
    g.set_defaults(func=run_generate)

    e = subparsers.add_parser(
        "eval",
        help="score a checkpoint on a benchmark (LongVideoBench, MLVU, ...)",
        description=EVAL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(e)
    e.add_argument(
        "--task",
        required=True,
        choices=TASK_NAMES,
        metavar="NAME",
        help="the benchmark: " + ", ".join(TASK_NAMES),
    )
    e.add_argument(
        "--annotations",
        required=True,
        metavar="FILE",
        help="the benchmark's annotation records (JSON array or JSONL)",
    )
    e.add_argument(
        "--video-root",
        required=True,
        metavar="DIR",
        help="directory the annotations' video paths are relative to",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="where results go")
    e.add_argument("--limit", type=int, metavar="N", help="only the first N samples")
    e.add_argument(
        "--longtimescope-prefixes",
        choices=("quirk", "fixed"),
        default="quirk",
        help="LongTimeScope's answer prefixes: 'quirk' (default) strips them as "
        "VideoNSA's copy did, two pairs concatenated by missing commas, so 'Best "
        "option: A' reads as B; 'fixed' uses TimeScope's list",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of LongVideoBench's guess for an answer with no letter",
    )
    e.set_defaults(func=run_eval_command)


def sampling_of(args: argparse.Namespace) -> VideoSampling:
    from nsa_jax.eval.video_qa import VideoSampling

    spg = args.second_per_grid_ts
    return VideoSampling(
        fps=args.fps,
        max_frames=args.max_frames,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        second_per_grid_ts=None if spg == "auto" else float(spg),
    )


def run_generate(args: argparse.Namespace) -> int:
    from nsa_jax.eval.runner import VideoError
    from nsa_jax.eval.video_qa import VideoQA

    try:
        qa = VideoQA(
            args.ckpt,
            dtype=args.dtype,
            sampling=sampling_of(args),
            system=args.system,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            progress=True,
        )

        def show(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        qa.answer(args.video, args.prompt, args.max_new_tokens, on_text=show)
    except (VideoError, ValueError, FileNotFoundError) as e:
        print(f"nsa-jax generate: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from nsa_jax.eval.runner import run_eval
    from nsa_jax.eval.tasks import get_task, load_samples
    from nsa_jax.eval.video_qa import VideoQA

    try:
        task = get_task(
            args.task,
            seed=args.seed,
            longtimescope_prefix_quirk=args.longtimescope_prefixes == "quirk",
        )
        samples = load_samples(task, args.annotations, args.video_root, limit=args.limit)
        qa = VideoQA(
            args.ckpt,
            dtype=args.dtype,
            sampling=sampling_of(args),
            system=args.system,
            progress=True,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"nsa-jax eval: error: {e}", file=sys.stderr)
        return 1
    settings = {
        "ckpt": args.ckpt,
        "annotations": args.annotations,
        "video_root": args.video_root,
        "limit": args.limit,
        "dtype": args.dtype,
        "system": args.system,
        "decoding": "greedy",
        "sampling": dataclasses.asdict(qa.sampling),
    }
    run_eval(task, samples, qa, args.out, settings=settings)
    return 0
