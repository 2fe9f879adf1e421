"""The tiny model config the model tests share (a uniquely named module, so it cannot clash with
another test directory's conftest on sys.path)."""

from __future__ import annotations

from llm_dist.config import ModelConfig


def tiny(**overrides) -> ModelConfig:
    """A 2-layer, 32-wide model over a 61-token vocabulary (padded to 64) with a 32-token context."""
    base = dict(vocab_size=61, vocab_multiple=64, block_size=32, n_layer=2, n_head=4, n_embd=32)
    base.update(overrides)
    return ModelConfig(**base)
