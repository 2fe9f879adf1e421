"""Linear + cross-entropy in chunks of tokens: the (tokens x vocab) logits never exist at once.

For hidden states H (N, C), LM-head weight W (V, C) and targets y (N,), the loss is
    L = sum_{i: y_i != ignore} lse(H_i W^T) - (H_i W^T)[y_i]
and, with G = softmax(H W^T) - onehot(y) on non-ignored rows (0 elsewhere),
    dL/dH = G W        dL/dW = G^T H.
Both are computed *in the forward*, one chunk of rows at a time: logits_c = H_c W^T (one (n, V) buffer
in the compute dtype), the row pass turns it into (loss_c, G_c) in place, then dH_c = G_c W is written
straight into its rows of dH (`torch.mm(out=)`) and dW += G_c^T H_c is accumulated into one buffer
(`addmm_`; the first chunk writes it with `mm(out=)`, so it is never zero-filled). Per chunk that is
three matmuls and one row kernel, no other launch and no other allocation. Backward only scales the
stored dH, dW by the incoming gradient, in place (L is a scalar).

Memory (see docs/kernels.md): one chunk of logits + dH (N, C) + dW (V, C), where the unfused path holds
the (N, V) logits and their gradient (and, eagerly, fp32 copies of both). dW accumulates in the compute
dtype (bf16 under autocast) and is cast to the weight's dtype once at the end: an fp32 accumulator would
add 4 bytes x V x C (2.1 GB at vocab 128k x hidden 4096), more than the logits it saves. To bound the
rounding of that accumulation the chunk rule keeps the number of chunks <= MAX_CHUNKS.

Chunk size 0 = auto (`auto_chunk_size`): rows such that the chunk's logits, counted in fp32, take about
1/8 of the full fp32 logits, clamped to [64 MiB, 512 MiB]; at least N / MAX_CHUNKS rows; a multiple of
128 rows (matmul tiles); never more than N. The chunk's rows are the inner dimension of the dW update,
whose (V, C) accumulator is read and written once per chunk: that traffic is small next to the
matmul only when the chunk has ~1k rows or more (the old rule, chunk logits ~ the size of H, gave 64-row
chunks at GPT-2 shapes: 128 small matmuls, 4x slower than unfused). Both benchmark shapes (8,192 tokens,
vocab 50,304 and 128,256) get 1,024-row chunks: 8 chunks, chunk logits 1/8 of the full ones.

The row pass is the Triton kernel (`cross_entropy.py`) when Triton can run, else the PyTorch
reference: the chunking, and so the memory saving, is the same on every device.
"""

from __future__ import annotations

from typing import Callable

import torch

from llm_dist.kernels.reference import cross_entropy_rows_reference

RowsFn = Callable[[torch.Tensor, torch.Tensor, int, bool], torch.Tensor]

MAX_CHUNKS = 16  # bounds the number of low-precision dW accumulations (and of launches)
CHUNK_MULTIPLE = 128  # rows: a multiple of the matmul tile
_MIB = 2 ** 20
CHUNK_BUDGET_MIN, CHUNK_BUDGET_MAX = 64 * _MIB, 512 * _MIB  # bytes of a chunk's logits counted in fp32


def auto_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: chunk fp32 logits ~ 1/8 of the full ones within [64, 512] MiB, <= MAX_CHUNKS chunks.

    A multiple of CHUNK_MULTIPLE rows (or n_rows itself when that is smaller); `hidden` does not enter the
    rule (the matmuls are large at any hidden size once the chunk has hundreds of rows), it is kept for
    the signature's sake.
    """
    del hidden
    n_rows, vocab = max(int(n_rows), 1), max(int(vocab), 1)
    budget = min(max(n_rows * vocab * 4 // 8, CHUNK_BUDGET_MIN), CHUNK_BUDGET_MAX)
    rows = max(budget // (vocab * 4) // CHUNK_MULTIPLE * CHUNK_MULTIPLE, CHUNK_MULTIPLE)
    fewest = -(-n_rows // MAX_CHUNKS)  # rows needed for at most MAX_CHUNKS chunks
    if rows < fewest:
        rows = -(-fewest // CHUNK_MULTIPLE) * CHUNK_MULTIPLE
    return min(rows, n_rows)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of (H W^T, y), gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,  # noqa: ANN001
                chunk: int, compute_dtype: torch.dtype, need_dh: bool, need_dw: bool, rows_fn: RowsFn) -> torch.Tensor:
        N, C = h.shape
        need_grad = need_dh or need_dw
        w = weight.to(compute_dtype)  # (V, C); a no-op when it already is (FSDP mixed precision, fp32 runs)
        row_loss = torch.empty(N, device=h.device, dtype=torch.float32)
        dh = torch.empty((N, C), device=h.device, dtype=compute_dtype) if need_dh else None
        dw = torch.empty(w.shape, device=h.device, dtype=compute_dtype) if need_dw else None  # (V, C)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            hc = h[s:e].to(compute_dtype)  # (n, C)
            logits = hc @ w.t()  # (n, V): the only vocab-sized buffer, freed at the next iteration
            row_loss[s:e] = rows_fn(logits, targets[s:e], ignore_index, need_grad)
            # logits now hold G = softmax - onehot (when need_grad)
            if need_dh:
                torch.mm(logits, w, out=dh[s:e])  # (n, C), rows of dH in place
            if need_dw:
                if s == 0:
                    torch.mm(logits.t(), hc, out=dw)  # (V, C): the first chunk writes the accumulator
                else:
                    dw.addmm_(logits.t(), hc)
        if need_dw and N == 0:
            dw.zero_()
        ctx.grads = (dh, dw) if need_grad else None
        ctx.dtypes = (h.dtype, weight.dtype)
        return row_loss.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice (or without gradients); its gradients are "
                               "computed once in the forward and consumed by the first backward")
        dh, dw = ctx.grads
        ctx.grads = None  # consumed: scaled in place below, so a second backward would be wrong
        h_dtype, w_dtype = ctx.dtypes
        dh = _scaled(dh, grad_loss, h_dtype) if dh is not None else None
        dw = _scaled(dw, grad_loss, w_dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None


def _scaled(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * scale in `dtype`, in place when no cast is needed (a cast to a wider dtype scales after it)."""
    if grad.dtype != dtype:
        grad = grad.to(dtype)
    return grad.mul_(scale.to(dtype))


# torch.compile runs this eagerly (a graph break): the launch logic (autotuned grids, Python chunk loops)
# is not something to trace, and the kernels are already fused.
@torch.compiler.disable
def linear_cross_entropy_chunked(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                                 chunk_size: int = 0, rows_fn: RowsFn = cross_entropy_rows_reference) -> torch.Tensor:
    """Sum over non-ignored rows of cross_entropy(h @ weight.T, targets), never materialising all the logits.

    h: (..., C) hidden states; weight: (V, C); targets: (...) int with `ignore_index` rows carrying no loss.
    Returns a float32 scalar. Matmuls run in the autocast dtype when autocast is on, else in the
    promoted dtype of h and weight; the per-row softmax always in fp32. Gradients for h and weight are
    computed in this call; the backward may run once.
    """
    C = h.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != C:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden size {C}")
    h2, t = h.reshape(-1, C), targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} hidden rows but {t.shape[0]} targets")
    chunk = chunk_size if chunk_size > 0 else auto_chunk_size(h2.shape[0], C, weight.shape[0])
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(h.dtype, weight.dtype)
    grad = torch.is_grad_enabled()
    need_dh, need_dw = grad and h.requires_grad, grad and weight.requires_grad  # a frozen LM head: no dW matmuls
    with torch.autocast(dev, enabled=False):  # dtypes are explicit inside
        return LinearCrossEntropyFunction.apply(h2, weight, t, ignore_index, max(chunk, 1), compute_dtype, need_dh,
                                                need_dw, rows_fn)
