"""Answer parsers and metrics of lmms-eval's task utilities, as VideoNSA's copy has them.

Each function reproduces the rule of `Espere-1119-Song/VideoNSA`,
`lmms-eval/lmms_eval/tasks/<task>/utils.py` (commit 377eeb9), quirks included, so that a score
computed here is the score lmms-eval would have given the same responses. Where upstream draws
an unseeded random letter, the caller passes a seeded `random.Random` instead.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np

# LongVideoBench and TimeScope strip these phrases (all occurrences) before looking for a letter.
ANSWER_PREFIXES: tuple[str, ...] = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)
# LongTimeScope's copy of the list lacks two commas, so Python concatenates the neighbours:
# "The best option is" / "The correct option is" and "Best answer:" / "Best option:" are never
# stripped on their own, and "Best option: A" parses as "B" (the capital of "Best").
LONGTIMESCOPE_PREFIXES: tuple[str, ...] = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)


def strip_prefixes(response: str, prefixes: Sequence[str]) -> str:
    """`response.strip()` with every occurrence of each prefix removed, in order."""
    s = response.strip()
    for p in prefixes:
        s = s.replace(p, "")
    return s


def parse_longvideobench(response: str) -> str | None:
    """LongVideoBench's `parse_multi_choice_response`: the first of `A`-`E` after stripping
    `ANSWER_PREFIXES`; None where upstream draws a random letter (no letter, or more than ten
    words without one)."""
    s = strip_prefixes(response, ANSWER_PREFIXES)
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return None
    m = re.search(r"[ABCDE]", s)
    return None if m is None else m[0]


def longvideobench_letter(
    response: str, choices: Sequence[str], rng: random.Random
) -> tuple[str, bool]:
    """`(letter, parsed)`: LongVideoBench's answer letter for `response`; when the parser finds
    none, a letter drawn from `choices` with `rng` (upstream's `random.choice`) and `False`."""
    letter = parse_longvideobench(response)
    if letter is None:
        return rng.choice(list(choices)), False
    return letter, True


def parse_timescope(response: str, *, prefix_quirk: bool = False) -> str:
    """TimeScope's `extract_characters_regex`: the first of `A`-`F` after stripping the answer
    prefixes, "" when none (or more than ten words without one). `prefix_quirk=True` strips
    LongTimeScope's concatenated list instead (`LONGTIMESCOPE_PREFIXES`)."""
    s = strip_prefixes(response, LONGTIMESCOPE_PREFIXES if prefix_quirk else ANSWER_PREFIXES)
    if len(s.split()) > 10 and not re.search("[ABCDEF]", s):
        return ""
    m = re.search(r"[ABCDEF]", s)
    return "" if m is None else m[0]


def parse_mlvu(response: str) -> str:
    """MLVU's `extract_characters_regex`: the character before the first `)` of the stripped
    response ("" when `)` comes first); without a `)`, the whole stripped response."""
    s = response.strip()
    if ")" in s:
        i = s.index(")")
        return s[i - 1 : i]
    return s


def parse_tomato(
    response: str, choices: Sequence[str], index2ans: dict[str, str]
) -> tuple[str, bool]:
    """`(letter, found)`: TOMATO's `parse_multi_choice_response` (lmms-eval's parser, not the
    GPT one); `found` is False where it falls back to "A".

    A choice letter found anywhere in the response is a candidate (any capital `A` counts);
    failing that ` X ` with spaces; failing that, for more than five words, the option texts.
    Several candidates: the one found last (by `rfind` of `(X)`, ` X ` or the option text; ties
    and all-absent go to the first). None: "A".
    """
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = " " + response + " "
    index_ans = True
    with_brackets = False
    candidates = []
    for c in choices:
        if c in response:
            candidates.append(c)
            with_brackets = True
    if not candidates:
        candidates = [c for c in choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        for c, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(c)
                index_ans = False
    if not candidates:
        return "A", False
    if len(candidates) == 1:
        return candidates[0], True
    if index_ans and with_brackets:
        starts = [response.rfind(f"({c})") for c in candidates]
    elif index_ans:
        starts = [response.rfind(f" {c} ") for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[int(np.argmax(starts))], True


def vsibench_first_word(response: str) -> str:
    """VSI-Bench's `fuzzy_matching`: the first space-separated word, trailing dots removed."""
    return response.split(" ")[0].rstrip(".").strip()


def to_float(text: str) -> float | None:
    """`float(text)`, None when it does not parse (VSI-Bench's `to_float`)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def mean_relative_accuracy(
    pred: float, target: float, start: float = 0.5, end: float = 0.95, interval: float = 0.05
) -> float:
    """VSI-Bench's Mean Relative Accuracy: the share of thresholds `c` in
    `linspace(start, end, int((end - start) / interval + 2))` (0.50, 0.55, ..., 0.95 by
    default: the float division makes the count 10) with `|pred - target| / target <= 1 - c`."""
    thresholds = np.linspace(start, end, int((end - start) / interval + 2))
    return float(np.mean(abs(pred - target) / target <= 1 - thresholds))


def vsibench_numeric_score(response: str, ground_truth: str) -> tuple[float, bool]:
    """`(MRA, parsed)` of a numeric answer; 0 when the first word or the ground truth is not a
    number (upstream catches the TypeError) or the ground truth is 0 (upstream would divide by
    zero)."""
    pred, target = to_float(vsibench_first_word(response)), to_float(ground_truth)
    if pred is None or target is None or target == 0:
        return 0.0, pred is not None
    return mean_relative_accuracy(pred, target), True


def exact_match(pred: str, target: str) -> float:
    """1.0 when equal ignoring case (VSI-Bench's multiple-choice metric)."""
    return 1.0 if pred.lower() == target.lower() else 0.0


def reasoning_answer(response: str) -> str:
    """lmms-eval's `parse_reasoning_model_answer`, applied to every response of VideoNSA's
    wrapper: the text inside the first `<answer>...</answer>`, else inside the first
    `\\boxed{...}`, else the response unchanged."""
    m = re.search(r"<answer>\s*(.*?)\s*</answer>", response, re.DOTALL)
    if m:
        return m[1]
    m = re.search(r"\\boxed\{\s*(.*?)\s*\}", response, re.DOTALL)
    return m[1] if m else response
