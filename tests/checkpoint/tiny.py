"""A tiny model with a populated AdamW state, for checkpoint tests that need real model/optimizer state."""

from __future__ import annotations

import torch

from llm_dist.config import ModelConfig
from llm_dist.model.transformer import Transformer, build_model

TINY_MODEL = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=16)


def tiny_model_opt(seed: int) -> tuple[Transformer, torch.optim.AdamW]:
    """The tiny model (seeded init) after one AdamW step, so moments and step counts are non-trivial."""
    model = build_model(TINY_MODEL, "cpu", seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt
