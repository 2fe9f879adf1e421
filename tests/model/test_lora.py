"""LoRA adapters (llm_dist/model/lora.py): frozen base, adapter-only gradients and optimizer state, B = 0 at
the start, the adapted layer against a float64 reference, merge = adapted forward, activation checkpointing,
checkpoints of the adapters only, and the config's checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llm_dist.config import Config, ConfigError, LoRAConfig, ModelConfig
from llm_dist.model.lora import LoRALinear, merge_lora_, trainable_names
from llm_dist.model.transformer import build_model

BASE = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=16, mlp="swiglu", mlp_multiple=32)
ALL = "wq,wk,wv,wo,up,gate,down"


def _lora(targets: str = ALL, rank: int = 4, **kw) -> ModelConfig:
    return dataclasses.replace(BASE, lora=LoRAConfig(rank=rank, alpha=8.0, targets=targets, **kw))


def _randomise_b(model: torch.nn.Module, seed: int = 0) -> None:
    """Trained-looking adapters: B != 0 (it starts at 0, where merged and adapted trivially agree)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_names_freezing_and_step_zero_equals_base():
    base, lora = build_model(BASE, "cpu", seed=3), build_model(_lora(), "cpu", seed=3)
    names = trainable_names(lora)
    assert len(names) == 2 * 7 * 2 and all(".lora_A" in n or ".lora_B" in n for n in names)
    assert "blocks.1.mlp.gate.lora_B" in names and "blocks.0.attn.wq.lora_A" in names
    # the base keeps its parameter names (so base checkpoints load unchanged) and its values
    base_sd, lora_sd = base.state_dict(), lora.state_dict()
    assert set(lora_sd) - set(base_sd) == set(names)
    for k, v in base_sd.items():
        assert torch.equal(lora_sd[k], v), k
    x = _tokens()
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the base model
    a = lora.blocks[0].attn.wq.lora_A
    assert a.abs().max() <= 1 / 32 ** 0.5 and a.std() > 0.5 / (3 * 32) ** 0.5  # U(-1/sqrt(in), 1/sqrt(in))


def test_only_adapters_get_gradients_and_optimizer_state():
    from llm_dist.config import OptimConfig
    from llm_dist.train.optim import build_optimizer

    model = build_model(_lora("wq,wv,down"), "cpu", seed=0)
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    model(_tokens()).square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in n), n
    # B = 0 gives A no gradient at step 0, but B's gradient is non-zero (A is random)
    assert model.blocks[0].attn.wq.lora_B.grad.abs().max() > 0
    opt.step()
    stated = {id(p) for p in opt.state}
    assert stated == {id(p) for n, p in model.named_parameters() if ".lora_" in n} and len(stated) == 2 * 3 * 2


def test_adapted_layer_matches_float64_reference():
    lin = torch.nn.Linear(12, 10)
    layer = LoRALinear(lin, rank=3, alpha=6.0)
    layer.init_adapters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, 12)
    W, b, A, B = (t.detach().double() for t in (lin.weight, lin.bias, layer.lora_A, layer.lora_B))
    ref = x.double() @ W.T + b + 2.0 * (x.double() @ A.T @ B.T)  # scaling = alpha / rank = 2
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)
    assert layer.weight is lin.weight  # shared, not copied


def test_merged_forward_equals_adapted_forward():
    model = build_model(_lora(), "cpu", seed=1).eval()
    _randomise_b(model)
    x = _tokens(1)
    with torch.no_grad():
        adapted = model(x)
        merge_lora_(model)
        merged = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(build_model(BASE, "cpu").state_dict())  # an ordinary model again
    assert (adapted - merged).abs().max() <= 1e-5
    assert (adapted - build_model(BASE, "cpu", seed=1)(x)).abs().max() > 1e-2  # the adapters did change it


def test_activation_checkpointing_gives_the_same_gradients():
    from llm_dist.config import ParallelConfig
    from llm_dist.parallel.ac import apply_activation_checkpointing

    grads = []
    for ac in ("none", "full", "selective"):
        model = build_model(_lora(dropout=0.1), "cpu", seed=2)
        _randomise_b(model)
        apply_activation_checkpointing(model.blocks, ParallelConfig(ac=ac))
        torch.manual_seed(0)  # the same dropout masks (AC replays them in the recomputation)
        model(_tokens()).square().mean().backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()
                      if p.grad is not None})
        assert sorted(trainable_names(model)) == sorted(grads[-1])
    for g in grads[1:]:
        for k, v in grads[0].items():
            torch.testing.assert_close(g[k], v, atol=1e-6, rtol=1e-5)


def test_checkpoint_state_holds_adapters_only(tmp_path):
    from llm_dist.checkpoint import sharded

    model = build_model(_lora("wq,wv"), "cpu", seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(_tokens()).square().mean().backward()
    opt.step()
    state = sharded.model_optim_state(model, opt, trainable_only=True)
    assert sorted(state["model"]) == sorted(trainable_names(model))
    assert sorted(state["optim"]["state"]) == sorted(trainable_names(model))
    sharded.save(state, str(tmp_path / "dcp"))
    fresh = build_model(_lora("wq,wv"), "cpu", seed=9)
    fopt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    tmpl = sharded.model_optim_state(fresh, fopt, trainable_only=True)
    sharded.load(tmpl, str(tmp_path / "dcp"))
    sharded.apply_model_optim_state(fresh, fopt, tmpl, trainable_only=True)
    for n in trainable_names(model):
        assert torch.equal(fresh.get_parameter(n), model.get_parameter(n)), n
    # the frozen base was neither saved nor touched
    assert not torch.equal(fresh.blocks[0].attn.wq.weight, model.blocks[0].attn.wq.weight)


@pytest.mark.parametrize("override, message", [
    ({"targets": "wq,qq"}, "model.lora.targets: 'qq' is not one of"),
    ({"targets": "wq,wq"}, "listed twice"),
    ({"targets": " "}, "expected at least one"),
    ({"alpha": 0.0}, "model.lora.alpha"),
    ({"dropout": 1.0}, "model.lora.dropout"),
])
def test_bad_lora_config_is_one_line(override, message):
    cfg = Config()
    cfg.model.lora = LoRAConfig(rank=4, **override)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_lora_config_needs_matching_layers():
    cfg = Config()
    cfg.model.lora = LoRAConfig(rank=4, targets="wq,gate")  # gelu MLP: no gate
    with pytest.raises(ConfigError, match="only model.mlp=swiglu"):
        cfg.validate()
    cfg.model.lora, cfg.model.moe.num_experts = LoRAConfig(rank=4, targets="up"), 4
    with pytest.raises(ConfigError, match="MLP layers are not supported"):
        cfg.validate()
    cfg.model.lora.rank = 0  # off: nothing is checked beyond its sign
    cfg.validate()
