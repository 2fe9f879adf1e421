"""AdamW parameter groups, learning-rate schedules and the batch-size ramp."""

from __future__ import annotations

import math

import pytest
import torch

from llm_dist.config import OptimConfig, TrainConfig
from llm_dist.model.transformer import build_model
from llm_dist.config import ModelConfig
from llm_dist.train.optim import batch_size_at, build_optimizer, lr_at, param_groups


def test_decay_groups_cover_every_parameter_once() -> None:
    model = build_model(ModelConfig(vocab_size=100, n_layer=2, n_embd=32, n_head=4, block_size=16), "cpu", seed=0)
    decay, no_decay = param_groups(model, 0.1)
    params = {id(p): p for p in model.parameters()}  # tied weights appear once
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(model, OptimConfig(fused="false", beta2=0.95), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


def _naive_cosine(step: int, peak: float, floor: float, warm: int, total: int) -> float:
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / (total - warm)
    return floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2


def test_cosine_with_warmup_matches_the_formula() -> None:
    cfg = OptimConfig(lr=6e-4, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    for step in range(0, 101):
        assert lr_at(step, cfg, 100) == pytest.approx(_naive_cosine(step, 6e-4, 6e-5, 10, 100), rel=1e-12)
    assert lr_at(100, cfg, 100) == pytest.approx(6e-5)
    assert lr_at(500, cfg, 100) == pytest.approx(6e-5)  # past the end: stays at the floor


def test_linear_constant_and_wsd() -> None:
    lin = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="linear")
    assert [lr_at(s, lin, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = OptimConfig(lr=2.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, const, 10) for s in range(4)] == pytest.approx([1.0, 2.0, 2.0, 2.0])
    wsd = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, wsd, 10) for s in range(11)]
    assert lrs[:8] == pytest.approx([1.0] * 8) and lrs[8:] == pytest.approx([1.0, 0.5, 0.0])


def test_batch_ramp_is_a_function_of_tokens_seen() -> None:
    cfg = TrainConfig(batch_size=64, micro_batch_size=4, batch_ramp_tokens=1000, batch_ramp_start=8)
    sizes = [batch_size_at(t, cfg, seq_len=10, quantum=8) for t in (0, 250, 500, 999, 1000, 10**9)]
    assert sizes == [8, 16, 32, 56, 64, 64]
    assert all(s % 8 == 0 for s in sizes)
    assert batch_size_at(5, TrainConfig(batch_size=32), 10, 8) == 32  # no ramp configured
