"""Session fixtures for the tokenizer tests: Tiny Shakespeare, GPT-2, and two small trained tokenizers."""

from __future__ import annotations

import random

import pytest

from llm_dist.tokenizer import BPETokenizer, load_gpt2, train_bpe
from tok_helpers import SHAKESPEARE, random_text


@pytest.fixture(scope="session")
def shakespeare() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2() -> BPETokenizer:
    return load_gpt2()


@pytest.fixture(scope="session")
def trained(shakespeare: str) -> BPETokenizer:
    """A 1024-id BPE trained on Tiny Shakespeare with GPT-2's pattern (~0.3 s)."""
    return train_bpe([shakespeare], 1024, pattern="gpt2", progress=False).to_tokenizer("shakespeare-1k")


@pytest.fixture(scope="session")
def trained_cl100k(shakespeare: str) -> BPETokenizer:
    """A BPE trained with the cl100k pattern and an extra special token, on Shakespeare + random Unicode."""
    extra = random_text(random.Random(0), 20_000)
    res = train_bpe([shakespeare[:300_000], extra], 800, pattern="cl100k", special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)
    return res.to_tokenizer("mixed-cl100k")
