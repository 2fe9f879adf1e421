"""Tokenizers: byte-level, BPE trained from scratch, and GPT-2's BPE, behind one interface."""

from __future__ import annotations

import os
from pathlib import Path

from llm_dist.tokenizer.base import EOT, Tokenizer
from llm_dist.tokenizer.bpe import BPETokenizer, TokenizerFileError, load_bpe_file
from llm_dist.tokenizer.bpe_train import BPETrainResult, learn_merges, train_bpe
from llm_dist.tokenizer.byte import ByteTokenizer
from llm_dist.tokenizer.gpt2 import load_gpt2, load_tiktoken_file, load_vocab_merges
from llm_dist.tokenizer.hf_import import HFTokenizer, is_hf_tokenizer_file, load_hf_tokenizer, load_hf_tokenizer_file
from llm_dist.tokenizer.pretokenize import CL100K_PATTERN, GPT2_PATTERN, PATTERNS

__all__ = [
    "EOT",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_hf_tokenizer",
    "BPETokenizer",
    "BPETrainResult",
    "TokenizerFileError",
    "load_tokenizer",
    "load_gpt2",
    "load_bpe_file",
    "load_tiktoken_file",
    "load_vocab_merges",
    "train_bpe",
    "learn_merges",
    "GPT2_PATTERN",
    "CL100K_PATTERN",
    "PATTERNS",
]

class UnknownTokenizerError(TokenizerFileError):
    """A tokenizer spec that is neither a known name nor a usable path (the message names the spec)."""

    def __init__(self, message: str) -> None:
        ValueError.__init__(self, message)


_EXPECTED = ("expected 'byte', 'gpt2', a saved tokenizer .json file, a .tiktoken file or a folder with vocab.json + "
             "merges.txt or a Hugging Face tokenizer.json")


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Build a tokenizer from a config string.

    - "byte": `ByteTokenizer`;
    - "gpt2": GPT-2's BPE from the bundled llm_dist/assets/gpt2_bpe/gpt2.tiktoken;
    - a path to a file saved by `BPETokenizer.save` (JSON, see docs/tokenizer.md);
    - a path to a `.tiktoken` file (GPT-2 pattern, `<|endoftext|>` after the last rank);
    - a path to a Hugging Face model folder with tokenizer.json (`HFTokenizer`; needs `tokenizers`), or a
      file saved by `HFTokenizer.save`;
    - a path to a folder holding vocab.json + merges.txt and no tokenizer.json (GPT-2 layout, GPT-2 pattern).

    Anything else, and any malformed file, raises TokenizerFileError (a ValueError) with one line.
    """
    s = os.fspath(spec)
    if s == "byte":
        return ByteTokenizer()
    if s == "gpt2":
        return load_gpt2()
    path = Path(s).expanduser()
    if path.is_dir():
        # tokenizer.json first: HF folders ship it beside vocab.json + merges.txt, and only it carries the
        # model's own pre-tokenizer (Qwen2's differs from GPT-2's, which load_vocab_merges assumes).
        if (path / "tokenizer.json").is_file():
            return load_hf_tokenizer(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return load_vocab_merges(path / "vocab.json", path / "merges.txt", name=path.name)
        raise UnknownTokenizerError(f"folder {s!r} has no vocab.json + merges.txt nor tokenizer.json; {_EXPECTED}")
    if path.is_file():
        if path.suffix == ".tiktoken":
            return load_tiktoken_file(path)
        if is_hf_tokenizer_file(path):
            return load_hf_tokenizer_file(path)
        return load_bpe_file(path)
    raise UnknownTokenizerError(f"unknown tokenizer {s!r} (not a known name or an existing path); {_EXPECTED}")
