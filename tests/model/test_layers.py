"""Norms, MLPs and positional encodings against float64 formulas written out independently."""

from __future__ import annotations

import math

import pytest
import torch

from llm_dist.model.layers import (
    MLP, LayerNorm, RMSNorm, RotaryEmbedding, apply_rope, mlp_hidden_size, rope_tables, sinusoidal_table,
)

from tiny_config import tiny


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Complex-number RoPE in float64: pair (x[2i], x[2i+1]) as x[2i] + i x[2i+1], multiply by e^{i p theta^(-2i/D)}."""
    D = x.shape[-1]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())  # (B, H, T, D/2)
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    angles = positions.double()[:, None] * freqs  # (T, D/2)
    rot = torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(xc * rot).reshape(x.shape)


@pytest.mark.parametrize("start", [0, 5])
def test_rope_matches_complex_reference(start):
    B, H, T, D, theta = 2, 3, 7, 16, 10000.0
    rope = RotaryEmbedding(D, block_size=64, theta=theta)
    x = torch.randn(B, H, T, D)
    out = apply_rope(x, *rope(start, T))
    ref = rope_reference(x, torch.arange(start, start + T), theta)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_rope_tables_accurate_at_large_positions():
    # Large p * inv_freq is where a float32 angle computation would drift; tables must stay within fp32 rounding.
    n, D, theta = 8192, 64, 500000.0
    cos, sin = rope_tables(n, D, theta)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    torch.testing.assert_close(cos.double(), torch.cos(angles), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin.double(), torch.sin(angles), atol=1e-7, rtol=0)


def test_rope_dot_product_depends_only_on_offset():
    D = 32
    rope = RotaryEmbedding(D, block_size=256, theta=10000.0)
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, *(t.double() for t in rope(m, 1)))
        kn = apply_rope(k, *(t.double() for t in rope(n, 1)))
        return float((qm * kn).sum())

    base = score(3, 1)
    for m, n in [(10, 8), (100, 98), (250, 248)]:
        assert math.isclose(score(m, n), base, rel_tol=1e-6, abs_tol=1e-7)  # fp32 tables
    assert not math.isclose(score(5, 1), base, rel_tol=1e-3)  # a different offset gives a different score
    # A rotation preserves the norm of every head vector.
    torch.testing.assert_close(apply_rope(q, *(t.double() for t in rope(77, 1))).norm(), q.norm())


def test_rmsnorm_matches_float64_formula():
    C, eps = 48, 1e-5
    norm = RMSNorm(C, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(C))
    x = 3.0 * torch.randn(4, 5, C) + 0.5
    x64, w64 = x.double(), norm.weight.detach().double()
    ref = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + eps) * w64
    torch.testing.assert_close(norm(x).double(), ref, atol=1e-5, rtol=1e-5)
    # bf16 in, bf16 out, within bf16 rounding of the float64 result.
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=2e-2)
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # no bias, no centring


def test_layernorm_without_bias():
    ln = LayerNorm(16, eps=1e-5, bias=False)
    assert ln.bias is None
    x = torch.randn(3, 16, dtype=torch.float64)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln.double()(x), ref)


def test_gelu_mlp_matches_explicit_formula():
    mlp = MLP(tiny(mlp="gelu", bias=True)).double()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    h = x @ mlp.up.weight.T + mlp.up.bias
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # GPT-2's tanh GELU
    ref = gelu @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x), ref)
    assert mlp.up.weight.shape == (4 * 32, 32) and mlp.gate is None


def test_swiglu_mlp_matches_explicit_formula():
    mlp = MLP(tiny(mlp="swiglu", bias=False, mlp_multiple=16)).double()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    g = x @ mlp.gate.weight.T
    ref = ((g * torch.sigmoid(g)) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), ref)
    assert mlp.up.bias is None and mlp.down.bias is None


@pytest.mark.parametrize("C,multiple", [(32, 16), (128, 256), (768, 64), (4096, 256)])
def test_swiglu_hidden_size_rule(C, multiple):
    h = mlp_hidden_size(tiny(mlp="swiglu", n_embd=C, mlp_multiple=multiple))
    assert h % multiple == 0 and int(8 * C / 3) <= h < int(8 * C / 3) + multiple
    assert mlp_hidden_size(tiny(mlp="gelu", n_embd=C)) == 4 * C
    assert mlp_hidden_size(tiny(mlp="swiglu", n_embd=C, mlp_hidden=1000)) == 1000


@pytest.mark.parametrize("dim", [8, 7])
def test_sinusoidal_table_matches_formula(dim):
    table = sinusoidal_table(50, dim)
    ref = torch.tensor([[math.sin(p / 10000 ** (i / dim)) if i % 2 == 0 else math.cos(p / 10000 ** ((i - 1) / dim))
                         for i in range(dim)] for p in range(50)], dtype=torch.float64)
    torch.testing.assert_close(table.double(), ref, atol=1e-7, rtol=0)
