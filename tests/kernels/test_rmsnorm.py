"""Fused RMSNorm (Triton) forward, dx and dweight against float64; the model's RMSNorm with norm_impl=triton."""

from __future__ import annotations

import pytest
import torch

from llm_dist.kernels import rms_norm_reference
from llm_dist.model.layers import RMSNorm

from tests.kernels.kernel_helpers import DEVICE, TOL, needs_cuda, needs_triton, quiet_interpreter, rel_err

pytestmark = [needs_triton, quiet_interpreter]


def _check(shape: tuple, dtype: torch.dtype, device: str = DEVICE, eps: float = 1e-5, rows: tuple = (0, 0)) -> None:
    from llm_dist.kernels.rmsnorm import rms_norm_triton

    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).requires_grad_()  # fp32 weight, as the model keeps it
    y = rms_norm_triton(x, w, eps, rows)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, eps)
    y64.backward(dy.double())
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == torch.float32
    tol = TOL[dtype]
    for name, got, ref in (("y", y, y64), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad)):
        err = rel_err(got, ref)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("shape, dtype", [((3, 5, 48), torch.float32), ((2, 3, 33), torch.float32),
                                          ((7, 100), torch.float16), ((1, 64), torch.float32), ((9, 130), torch.float32)])
def test_matches_float64_reference(shape: tuple, dtype: torch.dtype) -> None:
    _check(shape, dtype)


@pytest.mark.parametrize("shape, rows", [((9, 130), (4, 2)), ((13, 33), (8, 4)), ((5, 200), (1, 1)), ((3, 7, 17), (16, 8))])
def test_rows_per_program_not_dividing_the_rows(shape: tuple, rows: tuple) -> None:
    """Several rows per program: odd widths, row counts that leave the last tile (and program) partly empty."""
    _check(shape, torch.float32, rows=rows)


def test_launch_params_by_width() -> None:
    from llm_dist.kernels.rmsnorm import BWD_TILE, launch_params

    assert launch_params(2048) == (2048, 4, 16)  # 4 rows x 2048 per program
    assert launch_params(4096) == (4096, 2, 16)
    assert launch_params(8192) == (8192, 1, 16)
    assert launch_params(3000) == (4096, 2, 16)  # padded to a power of two
    assert launch_params(2048, BWD_TILE) == (2048, 2, 8)
    assert launch_params(64) == (64, 16, 4)
    with pytest.raises(ValueError, match="powers of two"):
        from llm_dist.kernels.rmsnorm import rms_norm_triton

        rms_norm_triton(torch.ones(2, 8), torch.ones(8), 1e-5, (3, 0))


def test_model_module_with_triton_impl_equals_torch_impl() -> None:
    x = torch.randn(2, 7, 40, device=DEVICE, requires_grad=True)
    ref, fused = RMSNorm(40, eps=1e-6).to(DEVICE), RMSNorm(40, eps=1e-6, impl="triton").to(DEVICE)
    with torch.no_grad():
        ref.weight.normal_(1.0, 0.2)
        fused.weight.copy_(ref.weight)
    (ref(x) * torch.arange(40, device=DEVICE)).sum().backward()
    g_ref, x.grad = x.grad.clone(), None
    (fused(x) * torch.arange(40, device=DEVICE)).sum().backward()
    assert rel_err(x.grad, g_ref) < TOL[torch.float32]
    assert rel_err(fused.weight.grad, ref.weight.grad) < TOL[torch.float32]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 1024, 768), (8192, 4096), (3, 1000, 2049)])
def test_gpu_large_shapes(shape: tuple, dtype: torch.dtype) -> None:
    _check(shape, dtype, device="cuda")
