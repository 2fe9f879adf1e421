"""Tokenizers: byte-level, BPE trained from scratch, and GPT-2's BPE, behind one interface."""

from __future__ import annotations

from llm_dist.tokenizer.base import EOT, Tokenizer
from llm_dist.tokenizer.byte import ByteTokenizer

__all__ = ["EOT", "Tokenizer", "ByteTokenizer", "load_tokenizer"]


def load_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from a config string: "byte", "gpt2", or the path of a saved BPE tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    raise ValueError(f"tokenizer.name: unknown tokenizer {spec!r}; expected 'byte', 'gpt2' or a tokenizer file path")
