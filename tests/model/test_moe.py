"""Mixture of Experts: vectorised dispatch vs a naive per-token loop (values and gradients, with and without
capacity), the auxiliary losses vs their formulas on a hand-built case, hybrid stacks, the loss wiring, and
training runs (loss falls on Tiny Shakespeare; two DDP ranks equal one process with idle experts)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm_dist.checkpoint import find_latest
from llm_dist.config import MoEConfig, moe_layers
from llm_dist.model.moe import MoE, moe_aux_loss
from llm_dist.model.transformer import build_model
from llm_dist.train.trainer import causal_lm_loss
from tests.helpers import read_metrics, run_launcher

from tiny_config import tiny


def _moe(**kw) -> MoE:
    cfg = tiny(mlp=kw.pop("mlp", "gelu"), mlp_hidden=24, moe=MoEConfig(**kw))
    layer = MoE(cfg).double()
    layer.init_weights(0.3, 0.3, torch.Generator().manual_seed(0))
    return layer


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: route, renormalise, run each chosen expert, respect capacity in token order."""
    B, T, C = x.shape
    xs = x.reshape(-1, C)
    N, E, k = xs.shape[0], layer.num_experts, layer.top_k
    logits = xs @ layer.router.weight.t()
    scores = F.softmax(logits, -1) if layer.router_kind == "softmax" else torch.sigmoid(logits)
    load = [0] * E
    counts = torch.bincount(scores.topk(k, -1).indices.reshape(-1), minlength=E)
    cap = math.ceil(layer.capacity_factor * N * k / E) if layer.capacity_factor > 0 else int(counts.max())
    out = []
    for n in range(N):
        w, e = scores[n].topk(k)
        w = w / w.sum()
        y = torch.zeros(C, dtype=x.dtype)
        for j in range(k):
            ex = int(e[j])
            load[ex] += 1
            if load[ex] > cap:  # this expert is full: the assignment is dropped
                continue
            h = xs[n] @ layer.w_up[ex]
            h = F.silu(xs[n] @ layer.w_gate[ex]) * h if layer.w_gate is not None else F.gelu(h, approximate="tanh")
            y = y + w[j] * (h @ layer.w_down[ex])
        if layer.shared is not None:
            y = y + layer.shared(xs[n][None])[0]
        out.append(y)
    return torch.stack(out).view(B, T, C)


@pytest.mark.parametrize("kw", [
    dict(num_experts=4, top_k=2), dict(num_experts=8, top_k=1, router="sigmoid"),
    dict(num_experts=4, top_k=2, mlp="swiglu", shared_expert=True), dict(num_experts=6, top_k=3, capacity_factor=0.5),
    dict(num_experts=4, top_k=1, capacity_factor=0.6, router="sigmoid", mlp="swiglu"),
])
def test_dispatch_equals_naive_loop_values_and_gradients(kw):
    layer = _moe(**kw)
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = naive_moe(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    got = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    want = torch.autograd.grad(ref, [x, *params], g, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:  # an expert the naive loop never touched: the batched path gives it an exact zero
            assert a is not None and not a.any()
        else:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    if kw.get("capacity_factor", 0) > 0:
        assert layer.stats["dropped"] > 0  # the capacity really cut something in these cases


def test_aux_losses_match_their_formulas_on_a_hand_built_case():
    # C = E = 4 and an identity router: token n's router logits are its own features.
    cfg = tiny(moe=MoEConfig(num_experts=4, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.25))
    cfg.n_embd = 4
    cfg.n_head = 1
    layer = MoE(cfg).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
        for w in (layer.w_up, layer.w_down):
            w.zero_()
    rows = [[2.0, 0, 0, 0], [0, 1.0, 0, 0], [3.0, 0, 0, 1.0]]  # experts chosen: 0, 1, 0
    layer(torch.tensor([rows], dtype=torch.float64))
    # f = (2/3, 1/3, 0, 0); P_e = mean over tokens of softmax(row)_e.
    probs = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in rows]
    P = [sum(p[e] for p in probs) / 3 for e in range(4)]
    balance = 4 * (2 / 3 * P[0] + 1 / 3 * P[1])
    z = sum(math.log(sum(math.exp(u) for u in r)) ** 2 for r in rows) / 3
    assert layer.stats["balance_loss"].item() == pytest.approx(balance, rel=1e-12)
    assert layer.stats["z_loss"].item() == pytest.approx(z, rel=1e-12)
    assert layer.aux_loss.item() == pytest.approx(0.5 * balance + 0.25 * z, rel=1e-12)
    assert layer.stats["load"].tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0])
    # Uniform routing gives a balance loss of exactly 1: f = P = 1/E.
    with torch.no_grad():
        layer.router.weight.zero_()
    layer(torch.randn(1, 8, 4, dtype=torch.float64))
    assert layer.stats["balance_loss"].item() == pytest.approx(1.0, rel=1e-12)


def test_hybrid_stack_layout_and_active_params():
    cfg = tiny(n_layer=6, moe=MoEConfig(num_experts=4, top_k=1, every_n_layers=2, first_dense_layers=1))
    assert moe_layers(cfg) == [False, True, False, True, False, True]
    model = build_model(cfg, "cpu", seed=0)
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == moe_layers(cfg)
    dense = build_model(tiny(n_layer=6), "cpu", seed=0)
    # Top-1 of 4 experts of the dense MLP's width: the active count is the dense count plus the routers.
    router = 3 * 4 * 32
    no_bias = 3 * (128 + 32)  # the dense MLPs' up/down biases, which experts do not have
    assert model.matmul_params() == dense.matmul_params() + router - no_bias


def test_lm_loss_adds_aux_scaled_by_targets_in_training_only():
    model = build_model(tiny(moe=MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01)), "cpu", seed=0)
    x = torch.randint(0, 61, (2, 16))
    y = torch.randint(0, 61, (2, 16))
    y[0, :5] = -100
    model.train()
    loss, n = causal_lm_loss(model, (x, y))
    ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    aux = moe_aux_loss(model)
    assert n.item() == 27
    torch.testing.assert_close(loss, ce + aux * 27)
    model.eval()
    loss_eval, _ = causal_lm_loss(model, (x, y))
    torch.testing.assert_close(loss_eval, ce.detach(), atol=1e-4, rtol=1e-5)


def test_every_expert_gets_a_gradient_even_when_idle():
    model = build_model(tiny(moe=MoEConfig(num_experts=16, top_k=1)), "cpu", seed=0)
    x = torch.randint(0, 61, (1, 3))  # 3 tokens, 16 experts: at least 13 idle per layer
    loss, _ = causal_lm_loss(model, (x, x))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.extra_metrics()["moe/idle"] >= 13 / 16


MOE_ARGS = ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.first_dense_layers=1", "model.bias=false"]


def test_moe_model_loss_falls_on_tiny_shakespeare(tmp_path: Path, prepared_byte_data: Path):
    run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
                  f"out_dir={tmp_path}", "train.max_steps=40", "train.log_interval=1", "eval.interval=0",
                  "eval.steps=2", "eval.sample_tokens=0", "train.detect_anomaly=false", *MOE_ARGS])
    m = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert m[-1]["loss"] < m[0]["loss"] - 1.5  # from ~ln(256)=5.5 down by well over a nat in 40 steps
    assert all("moe/aux" in r and "moe/load_max" in r for r in m)
    assert all(1.0 <= r["moe/load_max"] <= 8.0 and r["moe/balance"] >= 0.99 for r in m)


@pytest.mark.slow
def test_moe_under_ddp_and_fsdp_equals_single_process_with_idle_experts(tmp_path: Path, prepared_byte_data: Path):
    # 32 experts, top-1, 2 sequences of 8 tokens per micro-batch: many experts get no token on a rank in a
    # step; without every expert in the graph DDP would fail with an unused-parameter error.
    common = ["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
              "train.max_steps=4", "train.batch_size=8", "train.micro_batch_size=2", "model.block_size=8",
              "train.log_interval=1", "eval.interval=0", "eval.steps=1", "eval.sample_tokens=0",
              "checkpoint.interval=0", "model.moe.num_experts=32", "model.moe.top_k=1", "model.bias=false"]
    run_launcher([*common, f"out_dir={tmp_path / 'single'}"])
    l1 = [r for r in read_metrics(tmp_path / "single") if "loss" in r]
    for strategy in ("ddp", "fsdp"):
        run_launcher([*common, f"out_dir={tmp_path / strategy}", f"parallel.strategy={strategy}"], nproc=2)
        l2 = [r for r in read_metrics(tmp_path / strategy) if "loss" in r]
        assert len(l1) == len(l2) == 4
        assert max(abs(a["loss"] - b["loss"]) for a, b in zip(l1, l2)) < 1e-5, strategy
        assert all(r["moe/idle"] > 0 for r in l2)
        assert find_latest(tmp_path / strategy / "checkpoints") is not None


@pytest.mark.parametrize("overrides,message", [
    (["model.moe.num_experts=4", "model.moe.top_k=5"], "model.moe.top_k=5 must be in"),
    (["model.moe.num_experts=4", "model.moe.router=softmx"], "did you mean 'softmax'"),
    (["model.moe.num_experts=4", "model.moe.first_dense_layers=4"], "leaves no MoE layer"),
    (["model.moe.num_experts=4", "model.moe.every_n_layers=0"], "model.moe.every_n_layers"),
    (["model.ops=numpy"], "model.ops"),
])
def test_moe_and_ops_config_errors(overrides, message):
    from llm_dist.config import Config, ConfigError, apply_override

    cfg = Config()
    for o in overrides:
        apply_override(cfg, o)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
