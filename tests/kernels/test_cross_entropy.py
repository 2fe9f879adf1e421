"""Chunked linear + cross-entropy (PyTorch rows and the Triton row kernel) against F.cross_entropy in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llm_dist.kernels import auto_chunk_size, cross_entropy_rows_reference, linear_cross_entropy
from llm_dist.kernels.linear_cross_entropy import linear_cross_entropy_chunked

from tests.kernels.kernel_helpers import DEVICE, TOL, needs_cuda, needs_triton, quiet_interpreter, rel_err

pytestmark = quiet_interpreter
IGNORE = -100


def _data(N: int, C: int, V: int, dtype: torch.dtype = torch.float32, device: str = DEVICE, ignore_every: int = 5):
    h = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, C, device=device, dtype=dtype) / C ** 0.5).requires_grad_()
    t = torch.randint(0, V, (N,), device=device)
    if ignore_every:
        t[::ignore_every] = IGNORE
    return h, w, t


def _compare(loss_fn, N: int, C: int, V: int, dtype: torch.dtype, device: str = DEVICE) -> None:  # noqa: ANN001
    h, w, t = _data(N, C, V, dtype, device)
    loss = loss_fn(h, w, t)
    (0.5 * loss).backward()  # a non-unit incoming gradient: backward must scale the stored gradients
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), t, ignore_index=IGNORE, reduction="sum")
    (0.5 * ref).backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    tol = TOL[dtype]
    for name, got, want in (("loss", loss, ref), ("dh", h.grad, h64.grad), ("dw", w.grad, w64.grad)):
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("N, C, V, chunk", [(37, 16, 100, 8), (50, 32, 70, 0), (64, 16, 130, 64), (9, 8, 50, 100),
                                            (37, 16, 100, 13)])  # 13: the last chunk is ragged (37 = 2*13 + 11)
def test_pytorch_chunked_matches_cross_entropy(N: int, C: int, V: int, chunk: int) -> None:
    _compare(lambda h, w, t: linear_cross_entropy_chunked(h, w, t, IGNORE, chunk), N, C, V, torch.float32)


@needs_triton
@pytest.mark.parametrize("N, C, V, chunk, dtype", [(37, 16, 100, 8, torch.float32), (40, 16, 130, 16, torch.float16),
                                                   (20, 32, 70, 0, torch.float32), (29, 16, 70, 12, torch.float16)])
def test_triton_rows_match_cross_entropy(N: int, C: int, V: int, chunk: int, dtype: torch.dtype) -> None:
    from llm_dist.kernels.cross_entropy import cross_entropy_rows_triton

    _compare(lambda h, w, t: linear_cross_entropy_chunked(h, w, t, IGNORE, chunk, cross_entropy_rows_triton),
             N, C, V, dtype)


@needs_triton
def test_triton_row_kernel_equals_reference_rows() -> None:
    from llm_dist.kernels.cross_entropy import cross_entropy_rows_triton

    logits = torch.randn(6, 200, device=DEVICE) * 4
    t = torch.tensor([0, 199, IGNORE, 5, 64, 100], device=DEVICE)
    a, b = logits.clone(), logits.clone()
    la, lb = cross_entropy_rows_triton(a, t, IGNORE, True), cross_entropy_rows_reference(b, t, IGNORE, True)
    assert rel_err(la, lb) < 1e-5 and rel_err(a, b) < 1e-5
    assert la[2] == 0 and (a[2] == 0).all()  # ignored row: no loss, no gradient


def test_all_targets_ignored_gives_zero_loss_and_gradients() -> None:
    h, w, t = _data(12, 8, 30)
    t[:] = IGNORE
    loss = linear_cross_entropy(h, w, t, IGNORE, chunk_size=5)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_no_grad_computes_the_loss_only() -> None:
    h, w, t = _data(20, 8, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, IGNORE, chunk_size=8)
    ref = F.cross_entropy(h.detach() @ w.detach().t(), t, ignore_index=IGNORE, reduction="sum")
    assert loss.grad_fn is None and rel_err(loss, ref) < 1e-6


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces (element count)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_logits_never_exist_beyond_one_chunk() -> None:
    """Forward + backward of the chunked loss never create an (N, V) tensor, only (chunk, V) ones."""
    N, C, V, chunk = 256, 16, 500, 32
    h, w, t = _data(N, C, V, device="cpu")
    with _LargestAllocation() as mode:
        linear_cross_entropy_chunked(h, w, t, IGNORE, chunk).backward()
    assert mode.largest == chunk * V < N * V
    with _LargestAllocation() as mode:  # the unfused path, for contrast
        F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE, reduction="sum").backward()
    assert mode.largest == N * V


def test_auto_chunk_size_rule() -> None:
    """Chunks of hundreds-thousands of rows (large matmuls), fp32 chunk logits within [64, 512] MiB, <= 16 chunks."""
    from llm_dist.kernels.linear_cross_entropy import CHUNK_BUDGET_MAX, MAX_CHUNKS

    assert auto_chunk_size(8192, 768, 50304) == 1024  # 8 chunks; 1/8 of the fp32 logits = 206 MB
    assert auto_chunk_size(8192, 4096, 128256) == 1024  # 1/8 of the fp32 logits = 525 MB, capped at 512 MiB
    assert auto_chunk_size(16384, 4096, 128256) == 1024  # the cap: 16 chunks
    assert auto_chunk_size(65536, 4096, 128256) == 4096  # at most MAX_CHUNKS chunks, whatever the budget
    assert auto_chunk_size(1024, 768, 50304) == 256  # the 64 MiB floor: small batches take few chunks
    assert auto_chunk_size(100, 16, 300) == 100  # fewer rows than one tile: one chunk
    for n, v in [(8192, 50304), (8192, 128256), (65536, 128256), (3000, 32000), (100000, 50257), (5, 7)]:
        chunk = auto_chunk_size(n, 0, v)
        assert chunk == n or chunk % 128 == 0
        assert -(-n // chunk) <= MAX_CHUNKS
        fewest_rows = -(-n // MAX_CHUNKS)  # the chunk-count bound may take more rows than the budget
        assert chunk * v * 4 <= max(CHUNK_BUDGET_MAX, (fewest_rows + 127) // 128 * 128 * v * 4)


class _Allocations(TorchDispatchMode):
    """Counts new tensors of a given element count (outputs of views, out= and in-place ops alias an input)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if all(r.alias_info is None for r in func._schema.returns):
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor) and o.numel() == self.numel:
                    self.count += 1
        return out


def test_dw_accumulates_into_one_buffer() -> None:
    """One (V, C) buffer for dW over all chunks (mm(out=) then addmm_), scaled in place by the backward."""
    N, C, V = 100, 8, 30
    h, w, t = _data(N, C, V, device="cpu")
    with _Allocations(V * C) as mode:
        linear_cross_entropy_chunked(h, w, t, IGNORE, 16).backward()  # 7 chunks
    assert mode.count == 1


@pytest.mark.parametrize("frozen", ["h", "w"])
def test_frozen_input_gets_no_gradient_and_the_other_is_right(frozen: str) -> None:
    h, w, t = _data(30, 8, 41, device="cpu")
    (h if frozen == "h" else w).requires_grad_(False)
    with _Allocations(41 * 8) as mode:
        linear_cross_entropy_chunked(h, w, t, IGNORE, 7).backward()
    assert mode.count == (1 if frozen == "h" else 0)  # no (V, C) dW buffer when the weight is frozen
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), t, ignore_index=IGNORE, reduction="sum").backward()
    got, ref = (w.grad, w64.grad) if frozen == "h" else (h.grad, h64.grad)
    assert (h.grad if frozen == "h" else w.grad) is None and rel_err(got, ref) < 2e-5


def test_backward_twice_raises() -> None:
    h, w, t = _data(20, 8, 30)
    loss = linear_cross_entropy(h, w, t, IGNORE, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_mixed_dtypes_under_autocast_return_the_parameter_dtypes() -> None:
    """fp32 weights under bf16 autocast (single-GPU mixed precision): the grads come back fp32, the loss is right."""
    h, w, t = _data(40, 16, 50, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy_chunked(h, w, t, IGNORE, 16)
    loss.backward()
    ref = F.cross_entropy(h.detach().double() @ w.detach().double().t(), t, ignore_index=IGNORE, reduction="sum")
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert rel_err(loss, ref) < 2e-2


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gpt2_vocab(dtype: torch.dtype) -> None:
    _compare(lambda h, w, t: linear_cross_entropy(h, w, t, IGNORE, 0), 2048, 256, 50304, dtype, device="cuda")
