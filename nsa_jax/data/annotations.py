"""Annotation files (LLaVA-Video or ms-swift, JSON or JSONL) -> normalized records."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from nsa_jax.data.processor import count_video_placeholders

_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}


def normalize_record(rec: Any) -> dict[str, Any]:
    """LLaVA-Video or ms-swift record -> `{"videos": [...], "messages": [...], ...}`.

    Accepted shapes:
      LLaVA-Video: `{"video": p, "conversations": [{"from": "human"|"gpt", "value": s}, ...]}`
      ms-swift:    `{"messages": [{"role": r, "content": s}, ...], "videos": [p, ...]}`
    Optional `video_start` / `video_end` (seconds) select a clip.

    Raises:
      ValueError naming the problem (the caller adds file and line).
    """
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list):
            raise ValueError('"conversations" must be a list')
        messages = []
        for t in turns:
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise ValueError('each conversation turn needs "from" and "value"')
            if t["from"] not in _LLAVA_ROLES:
                raise ValueError(f"unknown speaker {t['from']!r}; use human/gpt/system")
            messages.append({"role": _LLAVA_ROLES[t["from"]], "content": t["value"]})
    elif "messages" in rec:
        turns = rec["messages"]
        if not isinstance(turns, list):
            raise ValueError('"messages" must be a list')
        messages = []
        for t in turns:
            if not isinstance(t, dict) or "role" not in t or "content" not in t:
                raise ValueError('each message needs "role" and "content"')
            if t["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {t['role']!r}; use system/user/assistant")
            messages.append({"role": t["role"], "content": t["content"]})
    else:
        raise ValueError('no "conversations" (LLaVA-Video) or "messages" (ms-swift) field')
    if not all(isinstance(m["content"], str) for m in messages):
        raise ValueError("message contents must be strings")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ValueError("no non-empty assistant answer to train on")
    videos = rec.get("videos", rec.get("video", []))
    videos = [videos] if isinstance(videos, str) else videos
    if not isinstance(videos, list) or not all(isinstance(v, str) for v in videos):
        raise ValueError('"video"/"videos" must be a path or a list of paths')
    n_ph = count_video_placeholders(messages)
    if n_ph not in (0, len(videos)):
        raise ValueError(f"{n_ph} <video> placeholders for {len(videos)} videos")
    out = {"videos": videos, "messages": messages}
    for k in ("video_start", "video_end"):
        if rec.get(k) is not None:
            out[k] = float(rec[k])
    return out


def _json_array_records(text: str) -> list[tuple[int, Any]]:
    """Parses a JSON array, returning (line number, element) for each element."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text):
            raise json.JSONDecodeError("unterminated array", text, i)
        if text[i] == "]":
            return out
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise json.JSONDecodeError(e.msg, text, e.pos) from None
        out.append((line, obj))


def read_annotations(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """Reads JSON (an array) or JSONL annotation files into normalized records.

    Each record gets `"source": "file:line"` for error messages. A malformed line fails fast
    with a ValueError naming its file and line.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records: list[dict] = []
    for path in paths:
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            try:
                items = _json_array_records(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        else:
            items = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    items.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        for lineno, obj in items:
            try:
                rec = normalize_record(obj)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed annotation: {e}") from None
            rec["source"] = f"{path}:{lineno}"
            records.append(rec)
    return records


def resolve_video(path: str, roots: Sequence[str]) -> str:
    """Absolute paths as they are; relative ones under the first root where the file exists."""
    if os.path.isabs(path) or not roots:
        return path
    for root in roots:
        cand = os.path.join(root, path)
        if os.path.exists(cand):
            return cand
    return os.path.join(roots[0], path)
