"""The whole model: every architecture combination, block wiring, meta build + GPT-2 init, counts and FLOPs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llm_dist.config import ModelConfig
from llm_dist.model.presets import get_preset
from llm_dist.model.transformer import Transformer, build_model, model_summary, padded_vocab_size

from tiny_config import tiny


@pytest.mark.parametrize("pos_emb,norm,norm_position", itertools.product(
    ["learned", "sinusoidal", "rope", "none"], ["layernorm", "rmsnorm", "none"], ["pre", "post"]))
def test_every_architecture_trains_one_step(pos_emb, norm, norm_position):
    cfg = tiny(pos_emb=pos_emb, norm=norm, norm_position=norm_position, mlp="swiglu" if norm == "rmsnorm" else "gelu",
               dropout=0.1, n_kv_head=2)
    model = Transformer(cfg)
    idx, targets = torch.randint(0, 61, (2, 16)), torch.randint(0, 61, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 64)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (norm_position == "pre" and norm != "none") == any(n.startswith("norm_f") for n, _ in model.named_parameters())


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_block_wiring(norm_position):
    model = Transformer(tiny(norm_position=norm_position)).eval()
    block = model.blocks[0]
    for p in block.parameters():  # non-trivial norms so a swapped order would show
        torch.nn.init.normal_(p, mean=0.5, std=0.3)
    x = torch.randn(2, 5, 32)
    if norm_position == "pre":
        h = x + block.attn(block.attn_norm(x))
        ref = h + block.mlp(block.mlp_norm(h))
    else:
        h = block.attn_norm(x + block.attn(x))
        ref = block.mlp_norm(h + block.mlp(h))
    torch.testing.assert_close(block(x), ref)


def test_forward_is_lm_head_of_forward_hidden():
    model = Transformer(tiny(tie_embeddings=False))
    idx = torch.randint(0, 61, (2, 9))
    hidden = model.forward_hidden(idx)
    assert hidden.shape == (2, 9, 32)
    torch.testing.assert_close(model(idx), hidden @ model.lm_head.weight.T)


def test_rejects_missing_vocab_and_overlong_input():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny(vocab_size=0))
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("vocab,multiple,padded", [(61, 64, 64), (64, 64, 64), (65, 64, 128), (50257, 64, 50304), (7, 1, 7)])
def test_padded_vocab_size(vocab, multiple, padded):
    assert padded_vocab_size(vocab, multiple) == padded
    assert padded % multiple == 0 and vocab <= padded < vocab + multiple


def test_meta_build_gives_gpt2_init():
    cfg = tiny(vocab_size=1000, n_embd=256, n_layer=4, n_head=4, block_size=64, mlp="gelu", pos_emb="learned")
    model = build_model(cfg, "cpu", seed=3)
    assert all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers()))
    # Tied weights are one tensor after meta -> to_empty -> init_weights.
    assert model.lm_head.weight is model.tok_emb.weight
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.parameters())) + 1
    assert model.tok_emb.weight.shape == (padded_vocab_size(1000, 64), 256) == (1024, 256)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            expected = out_std if name.endswith(("attn.wo.weight", "mlp.down.weight")) else std
            # Sample std of n >= 16k normals is within a few % of the true one.
            assert abs(p.std().item() / expected - 1) < 0.05, (name, p.std().item(), expected)
            assert abs(p.mean().item()) < 5 * expected / math.sqrt(p.numel()), name


def test_meta_build_recomputes_buffers_and_matches_eager_structure():
    for pos_emb in ("rope", "sinusoidal"):
        cfg = tiny(pos_emb=pos_emb)
        eager, built = Transformer(cfg), build_model(cfg, "cpu", seed=0)
        eb, bb = dict(eager.named_buffers()), dict(built.named_buffers())
        assert eb.keys() == bb.keys() and eb
        for name in eb:
            assert torch.equal(eb[name], bb[name]), name
        assert eager.state_dict().keys() == built.state_dict().keys()
        assert not any(k in built.state_dict() for k in bb)  # tables are non-persistent


def test_build_model_seed_is_deterministic_and_private():
    cfg = tiny(tie_embeddings=False)
    rng_before = torch.get_rng_state()
    a, b, c = build_model(cfg, "cpu", seed=7), build_model(cfg, "cpu", seed=7), build_model(cfg, "cpu", seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG was not consumed
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if "weight" in name and "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_tied_weights_share_storage_and_gradient():
    model = build_model(tiny(), "cpu", seed=0)
    with torch.no_grad():
        model.tok_emb.weight[5].fill_(1.0)
    assert torch.equal(model.lm_head.weight[5], torch.ones(32))
    model(torch.randint(0, 61, (1, 4))).sum().backward()
    assert model.lm_head.weight.grad is model.tok_emb.weight.grad


def test_state_dict_keys_are_prefix_free_and_round_trip():
    model = Transformer(tiny(pos_emb="rope", mlp="swiglu", n_kv_head=2))
    keys = list(model.state_dict())
    assert keys[0] == "tok_emb.weight" and keys[-1] == "lm_head.weight"
    assert {"blocks.0.attn.wq.weight", "blocks.1.attn.wk.weight", "blocks.1.mlp.gate.weight", "norm_f.weight"} <= set(keys)
    assert not any(k.startswith(("module.", "_orig_mod.", "_fsdp")) or "rope" in k for k in keys)
    other = Transformer(tiny(pos_emb="rope", mlp="swiglu", n_kv_head=2))
    other.load_state_dict(model.state_dict())
    idx = torch.randint(0, 61, (2, 8))
    torch.testing.assert_close(other(idx), model(idx), atol=0, rtol=0)


# ------------------------------------------------------------------------------------- counts and FLOPs

def gpt2_param_formula(V: int, T: int, L: int, C: int) -> int:
    """GPT-2 with tied embeddings: wte + wpe + L * (2 LayerNorms + qkv + proj + fc + proj) + final LayerNorm."""
    per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * per_layer + 2 * C


def test_gpt2_124m_param_count_on_meta():
    preset = get_preset("gpt2-124M")
    with torch.device("meta"):
        unpadded = Transformer(ModelConfig(**preset, vocab_size=50257, vocab_multiple=1))
        padded = Transformer(ModelConfig(**preset, vocab_size=50257, vocab_multiple=64))
    assert unpadded.tok_emb.weight.is_meta
    expect = gpt2_param_formula(50257, 1024, 12, 768)
    assert expect == 124_439_808  # the published GPT-2 small count, as a check on the formula itself
    assert unpadded.num_params() == expect
    assert padded.padded_vocab_size == 50304
    assert padded.num_params() == gpt2_param_formula(50304, 1024, 12, 768) == 124_475_904
    assert unpadded.num_params(non_embedding=True) == expect - 50257 * 768 - 1024 * 768


def test_llama_1b_param_count_on_meta():
    preset = get_preset("llama-1b")
    with torch.device("meta"):
        model = Transformer(ModelConfig(**preset, vocab_size=50257))
    V, C, L, hidden = 50304, 2048, 16, 8192
    kv_dim = 8 * (C // 32)
    per_layer = C * C + 2 * C * kv_dim + C * C + 3 * C * hidden + 2 * C  # q, k+v, o, gate/up/down, 2 RMSNorms
    assert model.num_params() == V * C + L * per_layer + C


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_flops_per_token(tie, pos_emb):
    cfg = tiny(tie_embeddings=tie, pos_emb=pos_emb, n_kv_head=2, n_layer=3)
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    tables = cfg.n_embd * (64 if not tie else 0) + (cfg.block_size * cfg.n_embd if pos_emb == "learned" else 0)
    N = total - tables  # input embedding lookup (untied) and position table excluded; LM head matmul kept
    for T in (8, 32):
        assert model.flops_per_token(T) == 6 * N + 12 * 3 * 4 * 8 * T
    assert model.flops_per_token() == model.flops_per_token(cfg.block_size)
    if not tie:
        assert model.lm_head.weight.numel() == 64 * 32  # counted in N


def test_model_summary_reports_counts():
    model = Transformer(tiny())
    s = model_summary(model)
    assert f"{model.num_params():,}" in s and "FLOPs/token" in s and "padded 64" in s
