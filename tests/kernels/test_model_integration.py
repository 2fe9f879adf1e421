"""The kernels inside the model: attn_impl=triton, norm_impl=triton and loss.impl=fused give the same
outputs and gradients as the default paths; unsupported calls fall back to SDPA with a one-time warning;
FSDP over 2 ranks with the fused loss trains to the single-process parameters."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from llm_dist.config import Config, ConfigError, ModelConfig, load_config
from llm_dist.kernels import backend
from llm_dist.model.generate import generate
from llm_dist.model.transformer import Transformer, build_model
from llm_dist.sft.packing import enable_packing, packed_lm_loss
from llm_dist.train.trainer import IGNORE_INDEX, causal_lm_loss

from tests.helpers import final_params, read_metrics, run_launcher
from tests.kernels.kernel_helpers import DEVICE, needs_triton, quiet_interpreter, rel_err

pytestmark = [needs_triton, quiet_interpreter]
TOL = 2e-5 if DEVICE == "cpu" else 5e-3  # fp32 (TF32 matmuls in the kernels on a GPU)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(backend, "_WARNED", set())  # every test sees its own one-time warnings


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, vocab_multiple=64, block_size=48, n_layer=2, n_head=2, n_kv_head=1, n_embd=64,
                pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    attn = kw.pop("attn", None)
    cfg = ModelConfig(**(base | kw))
    if attn:
        for k, v in attn.items():
            setattr(cfg.attn, k, v)
    return cfg


def _pair(**kw) -> tuple[Transformer, Transformer]:
    """(default model, model with the given kernel options), same architecture and weights."""
    ref = build_model(_cfg(**{k: v for k, v in kw.items() if k == "attn"}), DEVICE, seed=0)
    fast = build_model(_cfg(**kw), DEVICE, seed=0)
    return ref, fast


def _loss_and_grads(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss, _ = causal_lm_loss(model, (x, y))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _assert_same(ref: Transformer, fast: Transformer, T: int = 41) -> None:
    x, y = torch.randint(0, 61, (2, T), device=DEVICE), torch.randint(0, 61, (2, T), device=DEVICE)
    y[0, :5] = IGNORE_INDEX
    l_ref, g_ref = _loss_and_grads(ref, x, y)
    l_fast, g_fast = _loss_and_grads(fast, x, y)
    assert rel_err(l_fast, l_ref) < TOL
    for k in g_ref:
        assert rel_err(g_fast[k], g_ref[k]) < 10 * TOL, k  # gradients of tiny weights are noisier


@pytest.mark.parametrize("kw", [
    dict(attn_impl="triton"),
    dict(attn_impl="triton", attn=dict(window=8, pattern="local,global")),  # sliding window inside the kernel
    dict(norm_impl="triton"),
], ids=["attn", "attn-window", "norm"])
def test_kernel_paths_equal_default_model(kw: dict) -> None:
    ref, fast = _pair(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # these cases run the kernels: no fallback warning
        _assert_same(ref, fast)


def test_fused_loss_equals_logits_then_cross_entropy() -> None:
    ref, fast = _pair()
    fast.loss_impl, fast.loss_chunk_size = "fused", 16  # several chunks, the last one partial (82 tokens)
    _assert_same(ref, fast)


def test_kv_cache_generation_falls_back_to_sdpa_with_a_warning() -> None:
    ref, fast = _pair(attn_impl="triton")
    prompt = torch.randint(0, 61, (2, 5), device=DEVICE)
    with pytest.warns(RuntimeWarning, match="using SDPA for KV-cache decoding"):
        out = generate(fast, prompt, max_new_tokens=6, temperature=0.0)
    assert torch.equal(out, generate(ref, prompt, max_new_tokens=6, temperature=0.0))


def test_packed_documents_fall_back_to_sdpa_with_a_warning() -> None:
    ref, fast = _pair(attn_impl="triton")
    for m in (ref, fast):
        enable_packing(m)
    x, y = torch.randint(0, 61, (1, 12), device=DEVICE), torch.randint(0, 61, (1, 12), device=DEVICE)
    seg = torch.tensor([[0] * 5 + [1] * 7], device=DEVICE)
    with pytest.warns(RuntimeWarning, match="packed-document"):
        got = packed_lm_loss(fast, (x, y, seg))[0]
    assert rel_err(got, packed_lm_loss(ref, (x, y, seg))[0]) < TOL


def test_without_a_usable_triton_the_model_uses_sdpa(monkeypatch) -> None:
    import llm_dist.model.attention as attention

    monkeypatch.setattr(attention, "unsupported_reason", lambda t: "no GPU in this test")
    ref, fast = _pair(attn_impl="triton")
    x = torch.randint(0, 61, (2, 10), device=DEVICE)
    with pytest.warns(RuntimeWarning, match="model.attn_impl=triton: using SDPA for no GPU in this test"):
        got = fast(x)
    torch.testing.assert_close(got, ref(x), rtol=0, atol=0)  # the very same SDPA computation


@pytest.mark.parametrize("override, msg", [
    ("model.norm_impl=triton", "needs model.norm=rmsnorm"),
    ("model.attn_impl=flash", "model.attn_impl: 'flash' is not one of sdpa, manual, triton"),
    ("loss.impl=chunked", "loss.impl: 'chunked' is not one of torch, fused"),
    ("loss.chunk_size=-1", "loss.chunk_size"),
])
def test_config_errors_are_one_line(override: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        load_config(None, ["model.norm=layernorm", override]).validate()


def test_scratch_ops_reject_the_fused_loss() -> None:
    with pytest.raises(ConfigError, match="loss.impl=fused needs model.ops=torch"):
        load_config(None, ["model.ops=scratch", "loss.impl=fused"]).validate()
    assert Config().loss.impl == "torch" and Config().model.attn_impl == "sdpa"  # defaults unchanged


COMMON = ["launch/pretrain.py", "--config", "configs/debug.yaml", "train.max_steps=3", "train.batch_size=8",
          "train.micro_batch_size=2", "train.log_interval=1", "eval.interval=0", "eval.steps=2",
          "eval.sample_tokens=0", "checkpoint.interval=0", "model.bias=false", "model.n_kv_head=2"]


def test_fsdp_fused_loss_equals_single_process_torch_loss(tmp_path: Path, prepared_byte_data: Path) -> None:
    """The fused loss runs inside the FSDP root forward (lm_head.weight gathered) and its weight gradient
    reaches the sharded, tied embedding: 2 ranks with loss.impl=fused train to the 1-process torch loss."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run_launcher([*COMMON, f"data.dir={prepared_byte_data}", f"out_dir={single}"])
    run_launcher([*COMMON, f"data.dir={prepared_byte_data}", f"out_dir={sharded}", "parallel.strategy=fsdp",
                  "loss.impl=fused", "loss.chunk_size=48"], nproc=2)
    ref, got = final_params(single), final_params(sharded)
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= 1e-5, f"{k}: max |single torch loss - fsdp fused loss| = {diff:.2e}"
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (single, sharded)]
    for a, b in zip(*losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
