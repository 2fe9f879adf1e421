"""From-scratch ops (`model.ops=scratch`) against their torch counterparts: values and gradients in float64
(tight) and float32, the optimizer and clipping over several steps, a whole model, and a training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist.model import scratch
from llm_dist.model.transformer import build_model
from llm_dist.train.trainer import causal_lm_loss
from tests.helpers import read_metrics, run_launcher

from tiny_config import tiny

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(dtype, bias):
    ref = nn.Linear(12, 7, bias=bias).to(dtype)
    mine = scratch.Linear(12, 7, bias=bias).to(dtype)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 12, dtype=dtype, requires_grad=True)
    y, y_ref = mine(x), ref(x)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn_like(y)
    for a, b in zip(_grads(y, [x, *mine.parameters()], g), _grads(y_ref, [x, *ref.parameters()], g)):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_linear_under_bf16_autocast_matches_nn_linear():
    ref = nn.Linear(16, 8)
    mine = scratch.Linear(16, 8)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = mine(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, atol=1e-2, rtol=1e-2)
    g = torch.randn_like(y)
    for a, b in zip(_grads(y, [x, mine.weight], g), _grads(y_ref, [x, ref.weight], g)):
        assert a.dtype == b.dtype == torch.float32  # gradients come back in each input's own dtype
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_embedding_with_repeated_ids(dtype):
    ref = nn.Embedding(10, 6).to(dtype)
    mine = scratch.Embedding(10, 6).to(dtype)
    mine.load_state_dict(ref.state_dict())
    idx = torch.tensor([[1, 3, 3, 9], [3, 0, 1, 1]])  # repeats must accumulate
    y, y_ref = mine(idx), ref(idx)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn_like(y)
    torch.testing.assert_close(_grads(y, [mine.weight], g)[0], _grads(y_ref, [ref.weight], g)[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [-1, 1])
def test_softmax_including_masked_entries(dtype, dim):
    x = (3 * torch.randn(4, 6, 5, dtype=dtype)).masked_fill(torch.rand(4, 6, 5) < 0.3, float("-inf"))
    x[..., 0] = 1.0  # every row along either dim keeps a finite entry
    x[:, 0, :] = 1.0
    x.requires_grad_(True)
    y, y_ref = scratch.softmax(x, dim), F.softmax(x, dim)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn_like(y)
    torch.testing.assert_close(_grads(y, [x], g)[0], _grads(y_ref, [x], g)[0], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cross_entropy_with_ignore_index(dtype, reduction):
    logits = (4 * torch.randn(20, 13, dtype=dtype)).requires_grad_(True)
    target = torch.randint(0, 13, (20,))
    target[[2, 5, 11]] = -100
    y = scratch.cross_entropy(logits, target, ignore_index=-100, reduction=reduction)
    y_ref = F.cross_entropy(logits, target, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.tensor(1.7, dtype=dtype)
    grad = _grads(y, [logits], g)[0]
    torch.testing.assert_close(grad, _grads(y_ref, [logits], g)[0], **TOL[dtype])
    assert not grad[[2, 5, 11]].any()  # ignored rows get no gradient
    with pytest.raises(ValueError, match="reduction"):
        scratch.cross_entropy(logits, target, reduction="none")


def test_adamw_and_clipping_follow_torch_over_steps():
    torch.manual_seed(0)
    ps_ref = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)]
    ps = [p.detach().clone().requires_grad_(True) for p in ps_ref]
    groups = lambda params: [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]  # noqa: E731
    opt_ref = torch.optim.AdamW(groups(ps_ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = scratch.AdamW(groups(ps), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(6):
        for p_ref, p in zip(ps_ref, ps):
            g = torch.randn_like(p) * (10 if step % 2 else 0.1)  # alternately clipped and not
            p_ref.grad, p.grad = g.clone(), g.clone()
        n_ref = torch.nn.utils.clip_grad_norm_(ps_ref, 1.0)
        n = scratch.clip_grad_norm_(ps, 1.0)
        torch.testing.assert_close(n, n_ref, atol=1e-12, rtol=1e-12)
        for p_ref, p in zip(ps_ref, ps):
            torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-12, rtol=1e-12)
        opt_ref.step()
        opt.step()
        for p_ref, p in zip(ps_ref, ps):
            torch.testing.assert_close(p, p_ref, atol=1e-12, rtol=1e-10)
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_scratch_model_equals_torch_model():
    kw = dict(pos_emb="learned", mlp="swiglu", n_kv_head=2, tie_embeddings=False)
    ref = build_model(tiny(**kw), "cpu", seed=0).double()
    mine = build_model(tiny(ops="scratch", **kw), "cpu", seed=0).double()
    assert isinstance(mine.blocks[0].attn.wq, scratch.Linear) and isinstance(mine.tok_emb, scratch.Embedding)
    mine.load_state_dict(ref.state_dict())  # same parameter names and shapes
    x = torch.randint(0, 61, (2, 32))
    y = torch.randint(0, 61, (2, 32))
    y[0, :3] = -100
    # float64 end to end (causal_lm_loss would take the logits to float32 first).
    l_ref = F.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    l = scratch.cross_entropy(mine(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(l, l_ref, atol=1e-10, rtol=1e-12)
    l_ref.backward()
    l.backward()
    for (name, p_ref), p in zip(ref.named_parameters(), mine.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-10, rtol=1e-9, msg=name)
    # The LM loss picks the hand-written cross-entropy for this model.
    assert scratch.cross_entropy_for(mine) is scratch.cross_entropy
    assert scratch.cross_entropy_for(ref) is F.cross_entropy
    torch.testing.assert_close(causal_lm_loss(mine, (x, y))[0], causal_lm_loss(ref, (x, y))[0], atol=1e-3, rtol=1e-5)


@pytest.mark.slow
def test_scratch_training_run_tracks_the_torch_run(tmp_path: Path, prepared_byte_data: Path):
    common = ["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
              "train.max_steps=30", "train.log_interval=1", "eval.interval=0", "eval.steps=2",
              "eval.sample_tokens=0", "train.detect_anomaly=false"]
    run_launcher([*common, f"out_dir={tmp_path / 'torch'}"])
    out = run_launcher([*common, f"out_dir={tmp_path / 'scratch'}", "model.ops=scratch"])
    assert "error" not in out.stderr.lower()
    a = [r["loss"] for r in read_metrics(tmp_path / "torch") if "loss" in r]
    b = [r["loss"] for r in read_metrics(tmp_path / "scratch") if "loss" in r]
    assert len(a) == len(b) == 30
    assert b[-1] < b[0] - 1.0  # it trains
    # Same init, data and maths; only float32 rounding differs, and it grows slowly over 30 steps.
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-2
