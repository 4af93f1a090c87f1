"""`nsa-jax generate` (ask a checkpoint about a video) and `nsa-jax eval` (score a benchmark)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from nsa_jax.eval.tasks import TASK_NAMES

if TYPE_CHECKING:  # the model side is imported only when a command runs
    from nsa_jax.eval.video_qa import VideoSampling

GENERATE_DESCRIPTION = """\
Answers a question about a video with a checkpoint, streaming the answer as it
is generated. --ckpt: a training run (nsa-jax train --out; its latest step), one
of its steps (RUN/checkpoints/N), our exported model (nsa-jax export) or a
Hugging Face Qwen2.5-VL / VideoNSA directory.

The prompt is laid out as VideoNSA's evaluation did: system turn "You are a
helpful assistant.", then the video, then your text. The video is sampled at
--fps frames a second, at most --max-frames frames, each resized to at most
--max-pixels pixels (Qwen2.5-VL caps video frames at 602,112). Greedy decoding
unless --temperature > 0.

Exit status: 0 answered; 1 a bad --ckpt or --video (checked before the model
loads) or a video that cannot be read; 2 an option value out of range.
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
goes on. --ckpt takes what `nsa-jax generate --ckpt` takes. See docs/usage.md for
each task's fields.

Exit status: 0 scored; 1 a bad --ckpt, --annotations, --video-root or --out
(checked before the model loads), or no sample scored (every video failed:
"overall": null in results.json); 2 an option value out of range (--limit < 1,
...).
"""


# ---------------------------------------------------------------------------------- options
# Option values are checked as they are parsed: a bad one stops the command with argparse's
# one line naming the option (`argument --max-frames: ...`) and exit status 2.


def number(
    kind: type,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    why: str = "",
) -> Callable[[str], float]:
    """An argparse `type` reading an int or float within bounds; `why` ends the message."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        bad = (
            (at_least is not None and value < at_least and f"at least {at_least:g}")
            or (above is not None and value <= above and f"above {above:g}")
            or (at_most is not None and value > at_most and f"at most {at_most:g}")
        )
        if bad:
            raise argparse.ArgumentTypeError(f"must be {bad}{why}, got {text}")
        return value

    return parse


def seconds_or_auto(text: str) -> float | str:
    """`--second-per-grid-ts`: a positive number of seconds, or "auto"."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0 seconds (or 'auto'), got {text}")
    return value


def option_problem(args: argparse.Namespace) -> str | None:
    """What is wrong between options (each alone is checked by its `type`), or None."""
    if args.min_pixels > args.max_pixels:
        return f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}"
    return None


def path_problem(option: str, path: str, *, directory: bool) -> str | None:
    """`option path: ...` when `path` is not an existing directory (or file), else None."""
    if not os.path.exists(path):
        return f"{option} {path}: no such {'directory' if directory else 'file'}"
    if directory and not os.path.isdir(path):
        return f"{option} {path}: a file, not a directory"
    if not directory and os.path.isdir(path):
        return f"{option} {path}: a directory, not a file"
    return None


def out_problem(out: str) -> str | None:
    """`--out out: ...` unless `out` is, or could be made, a directory (it is made: the one sure
    check that it can be written, before the model loads)."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out}: a file, not a directory"
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"--out {out}: cannot be created ({e.strerror})"
    return None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt",
        required=True,
        metavar="DIR",
        help="a training run (its latest step), a step (RUN/checkpoints/N), our exported "
        "model (nsa-jax export) or a Hugging Face directory",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="parameter and activation dtype (default bfloat16)",
    )
    p.add_argument(
        "--fps",
        type=number(float, above=0),
        default=1.0,
        help="frames sampled a second (default 1)",
    )
    p.add_argument(
        "--max-frames",
        type=number(int, at_least=2, why=" (frames go to the model in pairs)"),
        default=32,
        help="at most this many frames (default 32, VideoNSA's wrapper)",
    )
    p.add_argument(
        "--min-pixels",
        type=number(int, at_least=1),
        default=200_704,
        help="least pixels a frame (default 200,704)",
    )
    p.add_argument(
        "--max-pixels",
        type=number(int, at_least=1),
        default=1_605_632,
        help="most pixels a frame (default 1,605,632; video frames are capped at "
        "602,112 in any case)",
    )
    p.add_argument(
        "--second-per-grid-ts",
        type=seconds_or_auto,
        default=1.0,
        metavar="S|auto",
        help="seconds per temporal patch given to the model: a number (default 1.0, "
        "as VideoNSA's wrapper) or 'auto' for the clip's own 2 / sampled fps",
    )
    p.add_argument("--system", default="You are a helpful assistant.", help="the system turn")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--temperature", type=number(float, at_least=0), default=0.0, help="0: greedy (default)"
    )
    p.add_argument(
        "--top-p",
        type=number(float, above=0, at_most=1),
        default=1.0,
        help="nucleus sampling (default 1: off)",
    )
    p.add_argument(
        "--top-k", type=number(int, at_least=0), default=0, help="top-k sampling (default 0: off)"
    )
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
    g.add_argument(
        "--max-new-tokens", type=number(int, at_least=1), default=512, help="default 512"
    )
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
    e.add_argument(
        "--limit", type=number(int, at_least=1), metavar="N", help="only the first N samples"
    )
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
        second_per_grid_ts=None if spg == "auto" else spg,
    )


def fail(command: str, message: str, status: int = 1) -> int:
    print(f"nsa-jax {command}: error: {message}", file=sys.stderr)
    return status


def run_generate(args: argparse.Namespace) -> int:
    from nsa_jax.ckpt import resolve_ckpt
    from nsa_jax.eval.runner import VideoError
    from nsa_jax.eval.video_qa import VideoQA

    if problem := option_problem(args):
        return fail("generate", problem, 2)
    try:
        resolve_ckpt(args.ckpt)  # before the video: a wrong --ckpt is the first thing to say
        if args.video is not None and (
            problem := path_problem("--video", args.video, directory=False)
        ):
            return fail("generate", problem)
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
        return fail("generate", str(e))
    sys.stdout.write("\n")
    return 0


def run_eval_command(args: argparse.Namespace) -> int:
    from nsa_jax.ckpt import resolve_ckpt
    from nsa_jax.eval.runner import run_eval
    from nsa_jax.eval.tasks import get_task, load_samples
    from nsa_jax.eval.video_qa import VideoQA

    if problem := option_problem(args):
        return fail("eval", problem, 2)
    try:
        # every path before any work: the model loads last
        resolve_ckpt(args.ckpt)
        if problem := (
            path_problem("--annotations", args.annotations, directory=False)
            or path_problem("--video-root", args.video_root, directory=True)
            or out_problem(args.out)
        ):
            return fail("eval", problem)
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
    except (ValueError, OSError) as e:
        return fail("eval", str(e))
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
    results = run_eval(task, samples, qa, args.out, settings=settings)
    if results["overall"] is None:
        c = results["counts"]
        return fail(
            "eval",
            f"no sample was scored ({c['failed']} of {c['samples']} videos "
            f"failed; failed_videos in {os.path.join(args.out, 'results.json')})",
        )
    return 0
