"""The train step in one process: accumulation, global token normalisation, clipping, autocast, compile."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_dist.config import Config, load_config
from llm_dist.distributed import Runtime
from llm_dist.checkpoint.sharded import apply_model_optim_state
from llm_dist.parallel import build_parallel_model
from llm_dist.train.trainer import IGNORE_INDEX, NonFiniteError, Trainer, causal_lm_loss, resolve_dtype

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
    amp = resolve_dtype(cfg.train.dtype, torch.device("cpu"))
    return Trainer(cfg, Runtime(), build_parallel_model(cfg, Runtime(), amp), amp_dtype=amp)


def _capture_grads(tr: Trainer) -> dict[str, torch.Tensor]:
    """The gradients exactly as the optimizer receives them (Adam's first step is lr*sign(g), so comparing
    parameters after it would amplify rounding noise in near-zero gradients into 2*lr differences)."""
    grads: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in tr.raw_model.named_parameters()}

    def hook(opt, args, kwargs) -> None:  # noqa: ANN001
        for group in opt.param_groups:
            for p in group["params"]:
                grads[names[id(p)]] = p.grad.detach().clone()

    tr.optimizer.register_step_pre_hook(hook)
    return grads


def test_accumulation_equals_one_big_batch_with_uneven_targets() -> None:
    x, y = _batch()
    big = _trainer(_cfg())
    small = _trainer(_cfg(**{"train.micro_batch_size": "2"}))
    g_big, g_small = _capture_grads(big), _capture_grads(small)
    m_big = big.train_step([(x, y)])
    m_small = small.train_step([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)])

    # The reference: mean cross-entropy over every target token of the global batch, in float64.
    ref = copy.deepcopy(_trainer(_cfg()).raw_model).double()
    expected = torch.nn.functional.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()
    assert m_big["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert m_small["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert m_small["grad_norm"] == pytest.approx(m_big["grad_norm"], rel=1e-5)
    # fp32 rounding is relative to the magnitudes being summed, i.e. to the model's gradient scale (the
    # key bias's true gradient is exactly 0, so a per-tensor relative bound would compare noise to noise).
    scale = max(p.grad.abs().max().item() for p in ref.parameters())
    for n, p in ref.named_parameters():
        for g in (g_big[n], g_small[n]):
            assert torch.allclose(g.double(), p.grad, rtol=0, atol=1e-5 * scale), n
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


def test_state_round_trip_continues_identically() -> None:
    a = _trainer(_cfg())
    a.train_step([_batch(3)])
    b = _trainer(_cfg(**{"optim.lr": "5e-3", "train.seed": "7"}))  # other init state is overwritten by the load
    apply_model_optim_state(b.raw_model, b.optimizer, copy.deepcopy(a.model_optim_state()))
    b.load_train_state(copy.deepcopy(a.train_state()))
    b.cfg = a.cfg
    assert a.train_step([_batch(4)])["loss"] == b.train_step([_batch(4)])["loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.raw_model.parameters(), b.raw_model.parameters()))
    assert b.state.step == 2 and set(a.model_optim_state()["model"]) == set(a.raw_model.state_dict())


def test_nonfinite_steps_are_skipped_then_halt() -> None:
    tr = _trainer(_cfg(**{"train.max_skipped_steps": "2"}))
    x, y = _batch(5)
    tr.train_step([(x, y)])
    good = [p.detach().clone() for p in tr.raw_model.parameters()]
    with torch.no_grad():
        tr.raw_model.blocks[1].mlp.down.weight[0, 0] = float("nan")  # poisons the loss and every gradient
    m = tr.train_step([(x, y)])
    assert m["skipped"] == 1 and tr.state.skipped_steps == 1 and tr.state.step == 2
    # The update was dropped: every parameter but the poisoned one is unchanged.
    for (n, p), g in zip(tr.raw_model.named_parameters(), good):
        assert n == "blocks.1.mlp.down.weight" or torch.equal(p, g), n
    with pytest.raises(NonFiniteError, match=r"step 3: loss is nan; non-finite gradients in .*2 non-finite steps in a row"):
        tr.train_step([(x, y)])


def test_nonfinite_halt_names_the_gradient() -> None:
    tr = _trainer(_cfg(**{"train.nonfinite": "halt"}))
    x, y = _batch(6)
    tr.raw_model.lm_head.weight.register_hook(lambda g: g * float("inf"))  # finite loss, inf gradient
    with pytest.raises(NonFiniteError, match=r"step 1: loss is finite; non-finite gradients in tok_emb.weight"):
        tr.train_step([(x, y)])


def test_activation_checkpointing_leaves_loss_and_gradients_unchanged() -> None:
    x, y = _batch(7)
    runs = {}
    for ac, sel in (("none", "op"), ("full", "op"), ("selective", "op"), ("selective", "layer")):
        tr = _trainer(_cfg(**{"parallel.ac": ac, "parallel.ac_selective": sel, "parallel.ac_every": "2",
                              "model.dropout": "0.1"}))
        torch.manual_seed(0)  # same dropout masks; recomputation must replay them exactly
        loss, n = causal_lm_loss(tr.model, (x, y))
        (loss / n).backward()
        grads = {k.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for k, p in tr.raw_model.named_parameters()}
        runs[(ac, sel)] = (loss.item(), grads, set(tr.raw_model.state_dict()))
    ref_loss, ref, ref_keys = runs[("none", "op")]
    for key, (loss, grads, keys) in runs.items():
        assert keys == ref_keys, key  # checkpoint wrappers leave state-dict names alone
        assert loss == ref_loss, key
        assert grads.keys() == ref.keys()
        for name in ref:
            assert torch.allclose(grads[name], ref[name], rtol=0, atol=1e-7), (key, name)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory) -> str:
    """One inductor cache for this module's compile tests (the second reuses the first's kernels)."""
    return str(tmp_path_factory.mktemp("inductor"))


def _record_loss_calls(monkeypatch) -> list[bool]:  # noqa: ANN001
    """Patch F.cross_entropy to record, per call, whether it ran while being compiled (Dynamo tracing)."""
    seen: list[bool] = []
    original = torch.nn.functional.cross_entropy

    def ce(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(torch.compiler.is_compiling())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    return seen


@pytest.mark.slow
def test_compiled_model_matches_eager(inductor_cache, monkeypatch) -> None:
    """train.compile: the loss is traced into the compiled forward (no eager fp32 logits); same loss/grads."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    eager, compiled = _trainer(_cfg()), _trainer(_cfg(**{"train.compile": "true"}))
    g_eager, g_compiled = _capture_grads(eager), _capture_grads(compiled)
    seen = _record_loss_calls(monkeypatch)
    for s in range(3):
        x, y = _batch(s)
        mbs = [(x[:4], y[:4]), (x[4:], y[4:])]  # accumulation: two micro-batches
        le = eager.train_step(mbs)["loss"]
        assert seen and not any(seen)  # eager: the loss ran eagerly
        seen.clear()
        lc = compiled.train_step(mbs)["loss"]
        assert seen and all(seen)  # compiled: only ever called while Dynamo traced the forward
        seen.clear()
        assert lc == pytest.approx(le, rel=1e-5 if s == 0 else 1e-4)
        if s == 0:  # later steps start from parameters Adam has already moved apart by its lr*sign(g) rounding
            scale = max(g.abs().max().item() for g in g_eager.values())
            for n, g in g_eager.items():
                assert torch.allclose(g_compiled[n], g, rtol=0, atol=1e-5 * scale), n
    assert set(compiled.model_optim_state()["model"]) == set(eager.raw_model.state_dict())  # no _orig_mod. prefix
    assert set(compiled.raw_model.state_dict()) == set(eager.raw_model.state_dict())


def test_compiled_loss_alone_matches_eager(inductor_cache, monkeypatch) -> None:
    """`compile_loss` (FSDP's path: blocks compiled one by one, the head + loss apart): same loss and grads."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    x, y = _batch(0)
    models = [_trainer(_cfg()).raw_model for _ in range(2)]
    models[1].compile_loss()
    assert models[1]._compiled_head_loss is not None
    out = []
    for m in models:
        loss = m(x, targets=y)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l_e, g_e), (l_c, g_c) = out
    assert torch.allclose(l_c, l_e, rtol=1e-6, atol=0)
    for n in g_e:
        assert torch.allclose(g_c[n], g_e[n], rtol=1e-5, atol=1e-7), n
    # The eager fallback of the same method with loss.impl=fused is untouched by compile_loss.
    fused = _trainer(_cfg()).raw_model
    fused.loss_impl = "fused"
    fused.compile_loss()
    assert fused._compiled_head_loss is None


@pytest.mark.slow
def test_compiled_lora_model_matches_eager_and_its_adapters_off_view(inductor_cache, monkeypatch) -> None:
    """train.compile with model.lora: same loss and adapter gradients as eager, base frozen in both, and the
    adapters-off view (DPO's reference) is the base under compile too (a second graph, not a wrong one)."""
    from llm_dist.model.lora import AdaptersOff, lora_layers

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", inductor_cache)
    lora = {"model.lora.rank": "4", "model.lora.alpha": "8", "model.lora.targets": "wq,wv,up,down"}
    eager, compiled = _trainer(_cfg(**lora)), _trainer(_cfg(**lora, **{"train.compile": "true"}))
    compiled.raw_model.load_state_dict(eager.raw_model.state_dict())
    for layer in lora_layers(eager.raw_model) + lora_layers(compiled.raw_model):  # B != 0: adapters matter
        torch.nn.init.normal_(layer.lora_B, std=0.02, generator=torch.Generator().manual_seed(layer.in_features))
    g_eager, g_compiled = _capture_grads(eager), _capture_grads(compiled)
    x, y = _batch(0)
    le = eager.train_step([(x, y)])["loss"]
    lc = compiled.train_step([(x, y)])["loss"]
    assert lc == pytest.approx(le, rel=1e-5)
    assert g_eager and set(g_eager) == set(g_compiled) and all(".lora_" in n for n in g_eager)  # adapters only
    scale = max(g.abs().max().item() for g in g_eager.values())
    for n, g in g_eager.items():
        assert torch.allclose(g_compiled[n], g, rtol=0, atol=1e-5 * scale), n
    with torch.no_grad():
        on = compiled.model(x)
        off = AdaptersOff(compiled.model)(x)
        base = _trainer(_cfg()).raw_model
        base.load_state_dict({k: v for k, v in compiled.raw_model.state_dict().items() if ".lora_" not in k})
        torch.testing.assert_close(off, base(x), atol=1e-5, rtol=1e-5)
        assert (on - off).abs().max() > 1e-4  # the adapters were on outside the view
