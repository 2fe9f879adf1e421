"""Packing: attention and positions confined to each example (no cross-contamination), with and without
activation checkpointing; the packed loss and its gradients equal the per-example ones."""

from __future__ import annotations

import pytest
import torch

from llm_dist.config import ModelConfig, ParallelConfig
from llm_dist.model.transformer import build_model
from llm_dist.parallel.ac import apply_activation_checkpointing
from llm_dist.sft.packing import enable_packing, packed, packed_lm_loss, segment_positions
from llm_dist.train.trainer import IGNORE_INDEX, causal_lm_loss


def _model(pos_emb: str, ac: str = "none", window: int = 0):
    cfg = ModelConfig(vocab_size=40, vocab_multiple=8, n_layer=2, n_head=2, n_embd=32, block_size=32, pos_emb=pos_emb)
    cfg.attn.window = window
    m = build_model(cfg, "cpu", seed=0)
    apply_activation_checkpointing(m.blocks, ParallelConfig(ac=ac))
    enable_packing(m)
    return m


def test_segment_positions():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 1, 1, 1, 2, 2, 2]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1, 2]]


@pytest.mark.parametrize("pos_emb,window", [("learned", 0), ("rope", 0), ("sinusoidal", 0), ("rope", 4)])
def test_changing_example_a_never_changes_example_b(pos_emb, window):
    torch.manual_seed(0)
    m = _model(pos_emb, window=window).eval()
    a, a2, b = torch.randint(0, 40, (1, 7)), torch.randint(0, 40, (1, 4)), torch.randint(0, 40, (1, 9))
    with torch.no_grad():
        with packed(torch.tensor([[0] * 7 + [1] * 9])):
            l1 = m(torch.cat([a, b], 1))  # (1, 16, V)
        with packed(torch.tensor([[0] * 4 + [1] * 9])):
            l2 = m(torch.cat([a2, b], 1))  # A replaced by a shorter, different example
        alone = m(b)
    torch.testing.assert_close(l1[:, 7:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(l2[:, 4:], alone, atol=1e-5, rtol=0)
    # and outside the context the model is the plain causal model again (B would see A)
    with torch.no_grad():
        assert (m(torch.cat([a, b], 1))[:, 7:] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("ac", ["none", "full"])
def test_packed_loss_and_grads_equal_separate_examples(ac):
    torch.manual_seed(1)
    m = _model("learned", ac=ac)
    xa, xb = torch.randint(0, 40, (1, 6)), torch.randint(0, 40, (1, 5))
    ya, yb = torch.randint(0, 40, (1, 6)), torch.randint(0, 40, (1, 5))
    ya[0, :2] = IGNORE_INDEX  # prompt tokens carry no loss
    pad = torch.full((1, 3), 0)
    x = torch.cat([xa, xb, pad], 1)
    y = torch.cat([ya, yb, torch.full((1, 3), IGNORE_INDEX)], 1)
    seg = torch.tensor([[0] * 6 + [1] * 5 + [-1] * 3])
    loss, n = packed_lm_loss(m, (x, y, seg))
    loss.backward()
    g_packed = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    la, na = causal_lm_loss(m, (xa, ya))
    lb, nb = causal_lm_loss(m, (xb, yb))
    (la + lb).backward()
    assert int(n) == int(na + nb) == 4 + 5
    torch.testing.assert_close(loss, la + lb, atol=1e-5, rtol=1e-5)
    for k, p in m.named_parameters():
        torch.testing.assert_close(g_packed[k], p.grad, atol=1e-5, rtol=1e-4)
