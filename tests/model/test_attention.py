"""Attention: the SDPA path against the manual reference and a naive per-query loop; causality; dropout."""

from __future__ import annotations

import math

import pytest
import torch

from llm_dist.model.attention import causal_mask, manual_attention, sdpa_attention
from llm_dist.model.transformer import Transformer

from tiny_config import tiny

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float64 loops: query i of the last Tq positions sees keys 0 .. Tk-Tq+i; head h reads K/V head h // (H/Hkv)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for h in range(H):
        kh, vh = k[:, h // (H // Hkv)], v[:, h // (H // Hkv)]  # (B, Tk, D)
        for i in range(Tq):
            last = Tk - Tq + i
            s = (q[:, h, i, None, :] * kh[:, : last + 1]).sum(-1) / math.sqrt(D)  # (B, last+1)
            out[:, h, i] = (torch.softmax(s, -1)[..., None] * vh[:, : last + 1]).sum(1)
    return out


@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("Tq,Tk", [(6, 6), (1, 9), (3, 9)])
def test_attention_kernels_match_naive(kind, Tq, Tk):
    # Tq < Tk is a chunk after a cached prefix (bottom-right aligned causal mask).
    B, H, D = 2, 4, 8
    q = torch.randn(B, H, Tq, D)
    k, v = torch.randn(B, HEADS[kind], Tk, D), torch.randn(B, HEADS[kind], Tk, D)
    ref = naive_attention(q, k, v)
    torch.testing.assert_close(manual_attention(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)


def test_causal_mask_alignment():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


def _pair(kind: str, pos_emb: str, dropout: float = 0.0) -> tuple[Transformer, Transformer]:
    sdpa = Transformer(tiny(n_kv_head=HEADS[kind], pos_emb=pos_emb, dropout=dropout, attn_impl="sdpa"))
    manual = Transformer(tiny(n_kv_head=HEADS[kind], pos_emb=pos_emb, dropout=dropout, attn_impl="manual"))
    manual.load_state_dict(sdpa.state_dict())
    return sdpa, manual


@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_sdpa_equals_manual_logits_and_grads(kind, pos_emb):
    sdpa, manual = _pair(kind, pos_emb)
    idx = torch.randint(0, 61, (3, 17))
    targets = torch.randint(0, 61, (3, 17))
    grads = []
    for model in (sdpa, manual):
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        if model is sdpa:
            ref_logits = logits.detach()
    torch.testing.assert_close(logits.detach(), ref_logits, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", list(HEADS))
def test_paths_agree_with_dropout_configured_in_eval(kind):
    # dropout > 0 in the config must be inert in eval mode: both paths equal and deterministic.
    sdpa, manual = _pair(kind, "rope", dropout=0.3)
    sdpa.eval(), manual.eval()
    idx = torch.randint(0, 61, (2, 12))
    torch.testing.assert_close(manual(idx), sdpa(idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(sdpa(idx), sdpa(idx))


@pytest.mark.parametrize("attend", [manual_attention, sdpa_attention])
def test_attention_dropout_is_unbiased(attend):
    # Inverted dropout keeps the expectation: the mean over many dropout draws approaches the dropout-free output.
    B, H, T, D, p, n = 1, 2, 6, 4, 0.3, 4000
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, 1, T, D), torch.randn(B, 1, T, D)
    clean = attend(q, k, v)
    draws = attend(q.expand(n, -1, -1, -1), k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), dropout_p=p)
    assert not torch.allclose(draws[0], clean)  # dropout did something
    # Per element std of one draw is <= |v|max * sqrt(p/(1-p)); the mean of n draws shrinks it by sqrt(n).
    bound = 5 * v.abs().max() * math.sqrt(p / (1 - p)) / math.sqrt(n)
    assert (draws.mean(0) - clean[0]).abs().max() < bound


@pytest.mark.parametrize("impl", ["sdpa", "manual"])
@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope", "none"])
def test_future_tokens_never_change_earlier_logits(impl, pos_emb):
    model = Transformer(tiny(pos_emb=pos_emb, attn_impl=impl, n_kv_head=2)).eval()
    idx = torch.randint(0, 61, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 61
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # the change is visible from position t on
