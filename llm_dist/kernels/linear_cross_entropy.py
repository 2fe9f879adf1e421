"""Linear + cross-entropy in chunks of tokens: the (tokens x vocab) logits never exist at once.

For hidden states H (N, C), LM-head weight W (V, C) and targets y (N,), the loss is
    L = sum_{i: y_i != ignore} lse(H_i W^T) - (H_i W^T)[y_i]
and, with G = softmax(H W^T) - onehot(y) on non-ignored rows (0 elsewhere),
    dL/dH = G W        dL/dW = G^T H.
Both are computed *in the forward*, one chunk of rows at a time: logits_c = H_c W^T (one (n, V) buffer
in the compute dtype), the row pass turns it into (loss_c, G_c) in place, then dH_c = G_c W and
dW += G_c^T H_c (fp32 accumulator). Backward only scales the stored dH, dW by the incoming gradient
(L is a scalar). Peak extra memory is one chunk of logits plus dH and an fp32 dW, instead of the
unfused path's logits, their fp32 copy, log-softmax and gradients, all (N, V).

The row pass is the Triton kernel (`cross_entropy.py`) when Triton can run, else the PyTorch
reference: the chunking, and so the memory saving, is the same on every device.
Chunk size 0 = auto: rows such that a chunk's logits are about as large as H itself (N*C elements),
rounded down to a power of two (the rule Liger-Kernel uses), at least 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from llm_dist.kernels.reference import cross_entropy_rows_reference

RowsFn = Callable[[torch.Tensor, torch.Tensor, int, bool], torch.Tensor]


def auto_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so that chunk x vocab ~ n_rows x hidden (the logits never outgrow H), a power of two."""
    rows = max(1, (n_rows * hidden) // max(vocab, 1))
    return 1 << (rows.bit_length() - 1)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of (H W^T, y), gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,  # noqa: ANN001
                chunk: int, compute_dtype: torch.dtype, need_grad: bool, rows_fn: RowsFn) -> torch.Tensor:
        N, C = h.shape
        w = weight.to(compute_dtype)  # (V, C); a no-op when it already is (FSDP mixed precision, fp32 runs)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        dh = torch.empty_like(h) if need_grad else None  # (N, C)
        dw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if need_grad else None  # (V, C)
        for s in range(0, N, chunk):
            hc = h[s : s + chunk].to(compute_dtype)  # (n, C)
            logits = hc @ w.t()  # (n, V): the only vocab-sized buffer, freed at the next iteration
            loss += rows_fn(logits, targets[s : s + chunk], ignore_index, need_grad).sum()
            if need_grad:  # logits now hold G = softmax - onehot
                dh[s : s + chunk] = logits @ w  # (n, C)
                dw.add_(logits.t() @ hc)  # (V, C), accumulated in fp32
        if need_grad:
            ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # noqa: ANN001, ANN205
        dh, dw = ctx.saved_tensors
        return dh * grad_loss.to(dh.dtype), (dw * grad_loss).to(ctx.weight_dtype), None, None, None, None, None, None


# torch.compile runs this eagerly (a graph break): the launch logic (autotuned grids, Python chunk loops)
# is not something to trace, and the kernels are already fused.
@torch.compiler.disable
def linear_cross_entropy_chunked(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                                 chunk_size: int = 0, rows_fn: RowsFn = cross_entropy_rows_reference) -> torch.Tensor:
    """Sum over non-ignored rows of cross_entropy(h @ weight.T, targets), never materialising all the logits.

    h: (..., C) hidden states; weight: (V, C); targets: (...) int with `ignore_index` rows carrying no loss.
    Returns a float32 scalar. Matmuls run in the autocast dtype when autocast is on, else in the
    promoted dtype of h and weight; the per-row softmax always in fp32.
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
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    with torch.autocast(dev, enabled=False):  # dtypes are explicit inside
        return LinearCrossEntropyFunction.apply(h2, weight, t, ignore_index, chunk, compute_dtype, need_grad, rows_fn)
