"""The train step in one process: accumulation, global token normalisation, clipping, autocast, compile."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_dist.config import Config, load_config
from llm_dist.distributed import Runtime
from llm_dist.model.transformer import build_model
from llm_dist.train.trainer import IGNORE_INDEX, Trainer, causal_lm_loss

V, T = 50, 16


def _cfg(**over: str) -> Config:
    args = ["model.vocab_size=50", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", f"model.block_size={T}",
            "train.batch_size=8", "train.micro_batch_size=8", "train.dtype=fp32", "optim.warmup_steps=0",
            "optim.fused=false", "train.grad_clip=0", *[f"{k}={v}" for k, v in over.items()]]
    return load_config(None, args).validate(1)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (8, T), generator=g)
    y = torch.randint(0, V, (8, T), generator=g)
    # Very uneven numbers of targets per sequence (prompt masking, padding): sequence i keeps i*2+1 targets.
    for i in range(8):
        y[i, : T - (2 * i + 1)] = IGNORE_INDEX
    return x, y


def _trainer(cfg: Config) -> Trainer:
    return Trainer(cfg, Runtime(), build_model(cfg.model, "cpu", seed=0))


def test_accumulation_equals_one_big_batch_with_uneven_targets() -> None:
    x, y = _batch()
    big = _trainer(_cfg())
    small = _trainer(_cfg(**{"train.micro_batch_size": "2"}))
    m_big = big.train_step([(x, y)])
    m_small = small.train_step([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])

    # The reference: mean cross-entropy over every target token of the global batch, in float64.
    ref = copy.deepcopy(_trainer(_cfg()).raw_model).double()
    logits = ref(x)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert m_big["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert m_small["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert m_small["grad_norm"] == pytest.approx(m_big["grad_norm"], rel=1e-5)
    for (n, a), b in zip(big.raw_model.named_parameters(), small.raw_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), n
    assert big.state.step == small.state.step == 1
    assert big.state.target_tokens_seen == sum(2 * i + 1 for i in range(8))


def test_gradient_clipping_bounds_the_update_norm() -> None:
    x, y = _batch(1)
    tr = _trainer(_cfg(**{"train.grad_clip": "1e-3"}))
    before = [p.detach().clone() for p in tr.raw_model.parameters()]
    loss, _ = causal_lm_loss(tr.raw_model, (x, y))
    (loss / (y != IGNORE_INDEX).sum()).backward()
    true_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in tr.raw_model.parameters()]))
    tr.optimizer.zero_grad()
    m = tr.train_step([(x, y)])
    assert m["grad_norm"] == pytest.approx(true_norm.item(), rel=1e-5)  # reported norm is the pre-clip norm
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.raw_model.parameters()))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_steps_reduce_loss_on_cpu(dtype: str) -> None:
    x, y = _batch(2)
    tr = _trainer(_cfg(**{"train.dtype": dtype, "optim.lr": "1e-2"}))
    assert (tr.scaler is not None) == (dtype == "fp16")  # fp16 needs loss scaling, bf16 does not
    losses = [tr.train_step([(x, y)])["loss"] for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1
    assert next(tr.raw_model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_state_dict_round_trip_continues_identically() -> None:
    a = _trainer(_cfg())
    a.train_step([_batch(3)])
    b = _trainer(_cfg(**{"optim.lr": "5e-3"}))  # other init state is overwritten by the load
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    b.cfg = a.cfg
    assert a.train_step([_batch(4)])["loss"] == b.train_step([_batch(4)])["loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.raw_model.parameters(), b.raw_model.parameters()))
    assert set(a.state_dict()["model"]) == set(a.raw_model.state_dict())  # no module./_orig_mod. prefixes


@pytest.mark.slow
def test_compiled_model_matches_eager(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager, compiled = _trainer(_cfg()), _trainer(_cfg(**{"train.compile": "true"}))
    for s in range(3):
        le = eager.train_step([_batch(s)])["loss"]
        lc = compiled.train_step([_batch(s)])["loss"]
        assert lc == pytest.approx(le, rel=1e-4)
    assert set(compiled.state_dict()["model"]) == set(eager.state_dict()["model"])  # no _orig_mod. prefix
