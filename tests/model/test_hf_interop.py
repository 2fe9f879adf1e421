"""Hugging Face interop: tiny random GPT-2 / Llama (GQA) / Mistral models built from configs (no download),
saved, loaded into llm_dist with equal logits; and llm_dist models exported and loaded by `transformers`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_dist.config import AttnConfig, MoEConfig
from llm_dist.model.hf_interop import HFFormatError, hf_architecture, load_hf, read_hf_weights, save_hf
from llm_dist.model.transformer import build_model

from tiny_config import tiny

transformers = pytest.importorskip("transformers")

V = 61  # not a multiple of 64: exercises the vocabulary padding on load and the cut on export


def _hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    return {
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=False)),
        "llama_tied_mqa": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)),
        "mistral_window": lambda: MistralForCausalLM(MistralConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, sliding_window=5)),
    }


def _randomise(model: torch.nn.Module) -> None:
    # HF inits norms to 1 / biases to 0; random values make every tensor's mapping matter to the logits.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "llama_tied_mqa", "mistral_window"])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_to_llm_dist_logits_match(tmp_path: Path, name: str, sharded: bool):
    hf = _hf_models()[name]().eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    model = load_hf(tmp_path)
    idx = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        want = hf(idx).logits
        got = model(idx)[:, :, :V]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.padded_vocab_size == 64 and not model(idx)[:, :, V:].any()  # padded columns are zeros
    if name == "mistral_window":
        assert model.cfg.attn.window == 5


@pytest.mark.parametrize("kw", [
    dict(),  # GPT-2 layout (the defaults)
    dict(tie_embeddings=False, mlp_hidden=48),
    dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, mlp_hidden=40, tie_embeddings=False),
    dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, mlp_hidden=40, attn=AttnConfig(window=6)),
])
def test_llm_dist_to_hf_logits_match(tmp_path: Path, kw):
    model = build_model(tiny(init_std=0.2, **kw), "cpu", seed=0).eval()
    with torch.no_grad():  # random norms and biases too
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in n else 0.0))
    save_hf(model, tmp_path, max_shard_bytes=30_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[:, :, :V], atol=1e-5, rtol=1e-5)
    # And back: the round trip reproduces every tensor (vocabulary tables up to the padding, which is not exported).
    again = load_hf(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        if k in ("tok_emb.weight", "lm_head.weight"):
            a, b = a[:V], b[:V]
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_unexportable_and_bad_folders_say_why(tmp_path: Path):
    with pytest.raises(HFFormatError, match="model.moe.num_experts=4"):
        hf_architecture(tiny(moe=MoEConfig(num_experts=4)))
    with pytest.raises(HFFormatError, match="norm_position=post"):
        hf_architecture(tiny(norm_position="post"))
    with pytest.raises(HFFormatError, match="neither GPT-2"):
        hf_architecture(tiny(pos_emb="rope"))
    with pytest.raises(HFFormatError, match="config.json: not found"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HFFormatError, match="model_type='bert' is not supported"):
        load_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFFormatError, match="pickle"):
        read_hf_weights(tmp_path)
