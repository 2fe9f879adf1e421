"""Triton FlashAttention forward (O, LSE) and backward (dQ, dK, dV) against a float64 reference."""

from __future__ import annotations

import random

import pytest
import torch

from llm_dist.kernels import attention_reference, flash_attention

from tests.kernels.kernel_helpers import DEVICE, TOL, needs_cuda, needs_triton, quiet_interpreter, rel_err

pytestmark = [needs_triton, quiet_interpreter]


def _random_cases(n: int, seed: int) -> list[tuple]:
    """(B, H, Hkv, Tq, Tk, D, causal, window, dtype): ragged lengths, GQA/MQA, windows, Tq < Tk."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        hkv = rng.choice([1, 2])
        H = hkv * rng.choice([1, 2])
        causal = i % 4 != 3
        Tk = rng.randint(17, 75)
        Tq = Tk if i % 3 else rng.randint(5, Tk)  # a third of the cases: queries after a prefix of keys
        window = rng.choice([0, 5, 24]) if causal and i % 2 else 0
        dtype = torch.float16 if i % 5 == 4 else torch.float32
        cases.append((rng.randint(1, 2), H, hkv, Tq, Tk, rng.choice([32, 64]), causal, window, dtype))
    return cases


CASES = [
    (2, 4, 2, 37, 37, 32, True, 0, torch.float32),  # GQA, ragged T (not a multiple of any block)
    (1, 2, 1, 64, 64, 64, True, 0, torch.float32),  # MQA, T a multiple of the blocks
    (1, 2, 2, 33, 45, 32, False, 0, torch.float32),  # non-causal, Tq != Tk
    (1, 2, 1, 70, 70, 32, True, 7, torch.float32),  # window smaller than a key block
    (2, 2, 1, 45, 45, 32, True, 0, torch.float16),
] + _random_cases(7, seed=1)


def _ids(c: tuple) -> str:
    B, H, Hkv, Tq, Tk, D, causal, window, dtype = c
    return f"B{B}H{H}kv{Hkv}-q{Tq}k{Tk}-D{D}-{'causal' if causal else 'full'}-w{window}-{str(dtype)[6:]}"


def _check(B, H, Hkv, Tq, Tk, D, causal, window, dtype, device=DEVICE) -> None:  # noqa: ANN001
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Tk, D, device=device, dtype=dtype, requires_grad=True)
    o = flash_attention(q, k, v, causal=causal, window=window)
    do = torch.randn_like(o)
    o.backward(do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, lse64 = attention_reference(q64, k64, v64, causal=causal, window=window)
    o64.backward(do.double())
    from llm_dist.kernels.flash_attention import flash_attention_forward

    _, lse = flash_attention_forward(q.detach(), k.detach(), v.detach(), causal=causal, window=window)
    tol = TOL[dtype]
    for name, got, ref in (("O", o, o64), ("LSE", lse, lse64), ("dQ", q.grad, q64.grad), ("dK", k.grad, k64.grad),
                           ("dV", v.grad, v64.grad)):
        assert got.dtype == (torch.float32 if name == "LSE" else dtype)
        err = rel_err(got, ref)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_float64_reference(case: tuple) -> None:
    _check(*case)


def test_reference_agrees_with_sdpa() -> None:
    """The oracle itself: causal + GQA equals torch's SDPA (so the kernel is checked against torch semantics)."""
    q, k, v = torch.randn(2, 4, 9, 16, dtype=torch.float64), torch.randn(2, 2, 9, 16, dtype=torch.float64), \
        torch.randn(2, 2, 9, 16, dtype=torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(attention_reference(q, k, v, causal=True)[0], ref) < 1e-12


def test_noncontiguous_inputs_as_the_model_makes_them() -> None:
    """q/k/v as views (B, T, H, D).transpose(1, 2): strided, not contiguous."""
    x = torch.randn(2, 40, 3 * 2, 32, device=DEVICE, requires_grad=True)
    q, k, v = x[:, :, :2].transpose(1, 2), x[:, :, 2:4].transpose(1, 2), x[:, :, 4:].transpose(1, 2)
    o = flash_attention(q, k, v)
    o.sum().backward()
    x64 = x.detach().double().requires_grad_()
    q6, k6, v6 = x64[:, :, :2].transpose(1, 2), x64[:, :, 2:4].transpose(1, 2), x64[:, :, 4:].transpose(1, 2)
    o64 = attention_reference(q6, k6, v6)[0]
    o64.sum().backward()
    assert rel_err(o, o64) < TOL[torch.float32] and rel_err(x.grad, x64.grad) < TOL[torch.float32]


@pytest.mark.parametrize("bad, msg", [
    (dict(D=48), "head dim 48"),
    (dict(Tq=20, Tk=10), "Tq <= Tk"),
    (dict(causal=False, window=4), "needs causal=True"),
    (dict(Hkv=3), "multiple of n_kv_head"),
])
def test_bad_shapes_raise_one_line(bad: dict, msg: str) -> None:
    p = dict(B=1, H=4, Hkv=2, Tq=10, Tk=10, D=32, causal=True, window=0) | bad
    q = torch.randn(p["B"], p["H"], p["Tq"], p["D"])
    k = torch.randn(p["B"], p["Hkv"], p["Tk"], p["D"])
    with pytest.raises(ValueError, match=msg):
        from llm_dist.kernels.flash_attention import flash_attention_triton

        flash_attention_triton(q, k, k, causal=p["causal"], window=p["window"])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1000, 128, True, 0), (2, 16, 16, 2048, 2048, 64, True, 0),
                                   (1, 8, 4, 1537, 1537, 128, True, 256), (2, 4, 4, 513, 700, 64, False, 0)])
def test_gpu_large_shapes(shape: tuple, dtype: torch.dtype) -> None:
    _check(*shape, dtype, device="cuda")
