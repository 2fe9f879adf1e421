"""Sliding-window attention, attention sinks, per-layer patterns and padding masks: every fast path against
the mask-based reference (`manual_attention` with `attention_mask`), and the mask against its formula."""

from __future__ import annotations

import pytest
import torch

from llm_dist.config import AttnConfig, Config, ConfigError, layer_kinds
from llm_dist.model.attention import attention_mask, local_attention, manual_attention, sdpa_attention
from llm_dist.model.transformer import build_model

from tiny_config import tiny


def naive_allowed(q: int, k: int, window: int, sinks: int) -> bool:
    """The visibility rule written as the docs state it."""
    if q < 0 or k < 0 or k > q:
        return False
    return window == 0 or q - k < window or k < sinks


@pytest.mark.parametrize("window,sinks", [(0, 0), (1, 0), (3, 0), (3, 2), (5, 1)])
def test_mask_matches_the_rule_including_padding(window, sinks):
    q_pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    k_pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    m = attention_mask(q_pos, k_pos, window, sinks)
    assert m.shape == (2, 1, 8, 8)
    for b in range(2):
        for i in range(8):
            row = [naive_allowed(int(q_pos[b, i]), int(k_pos[b, j]), window, sinks) for j in range(8)]
            if not any(row):  # a padding query sees everything (finite, ignored) instead of nothing (NaN)
                row = [True] * 8
            assert m[b, 0, i].tolist() == row


@pytest.mark.parametrize("T,window,sinks,H,Hkv", [
    (19, 4, 0, 4, 2), (19, 4, 2, 4, 4), (20, 3, 5, 2, 1), (8, 8, 1, 4, 4), (33, 1, 0, 2, 2), (16, 4, 4, 2, 1),
])
def test_local_attention_equals_masked_reference(T, window, sinks, H, Hkv):
    q = torch.randn(2, H, T, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hkv, T, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hkv, T, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(T)[None]
    ref = manual_attention(q, k, v, mask=attention_mask(pos, pos, window, sinks))
    out = local_attention(q, k, v, window, sinks)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_sdpa_with_a_padding_mask_equals_reference():
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 10, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 10, 8, dtype=torch.float64)
    k_pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    q_pos = k_pos[:, -6:]
    mask = attention_mask(q_pos, k_pos, 4, 1)
    torch.testing.assert_close(sdpa_attention(q, k, v, mask=mask), manual_attention(q, k, v, mask=mask),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("attn", [
    AttnConfig(window=4), AttnConfig(window=4, sinks=2), AttnConfig(window=3, pattern="local,global"),
    AttnConfig(window=5, sinks=1, pattern="global,local"),
])
@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_model_fast_path_equals_manual_reference(attn, n_kv_head):
    # Same weights, attn_impl sdpa (banded local kernel / masked SDPA) vs manual (explicit mask), float64.
    fast = build_model(tiny(pos_emb="rope", n_kv_head=n_kv_head, attn=attn), "cpu", seed=3).double()
    ref = build_model(tiny(pos_emb="rope", n_kv_head=n_kv_head, attn=attn, attn_impl="manual"), "cpu", seed=3).double()
    ref.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 61, (2, 32))
    torch.testing.assert_close(fast(idx), ref(idx), atol=1e-10, rtol=1e-10)
    # A window narrower than the sequence really changes the result (the masks are not no-ops).
    full = build_model(tiny(pos_emb="rope", n_kv_head=n_kv_head), "cpu", seed=3).double()
    full.load_state_dict(fast.state_dict())
    assert (full(idx) - fast(idx)).abs().max() > 1e-3


def test_window_covering_the_context_is_full_attention():
    a = build_model(tiny(attn=AttnConfig(window=32)), "cpu", seed=0)
    b = build_model(tiny(), "cpu", seed=0)
    idx = torch.randint(0, 61, (2, 32))
    torch.testing.assert_close(a(idx), b(idx), atol=1e-6, rtol=1e-6)


def test_layer_patterns_and_windows():
    cfg = tiny(n_layer=5, attn=AttnConfig(window=4, sinks=1, pattern="local,local,global"))
    assert layer_kinds(cfg) == ["local", "local", "global", "local", "local"]
    model = build_model(cfg, "cpu", seed=0)
    assert [(b.attn.window, b.attn.sinks) for b in model.blocks] == [(4, 1), (4, 1), (0, 0), (4, 1), (4, 1)]
    assert not model.streaming  # a global layer needs every position: no rolling cache
    assert build_model(tiny(pos_emb="rope", attn=AttnConfig(window=4)), "cpu", seed=0).streaming
    assert not build_model(tiny(pos_emb="learned", attn=AttnConfig(window=4)), "cpu", seed=0).streaming


@pytest.mark.parametrize("override,message", [
    ("model.attn.sinks=2", "model.attn.sinks=2 needs a sliding window"),
    ("model.attn.pattern=local,glob", "model.attn.pattern"),
    ("model.attn.pattern=local", "has local layers but model.attn.window=0"),
    ("model.attn.window=-1", "model.attn.window"),
])
def test_attention_config_errors(override, message):
    from llm_dist.config import apply_override

    cfg = Config()
    apply_override(cfg, override)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
