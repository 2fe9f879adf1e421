"""Triton row kernel of the fused linear + cross-entropy: loss per row and, in place, d(loss)/d(logits).

One program per row of a logits chunk (n, V), in two passes over the vocabulary in BLOCK_V slices:
  1. online max / sum of exponentials (fp32 registers) -> lse = m + log(sum exp(x - m));
     loss = lse - x[target] (0 for ignore_index rows);
  2. (training) overwrite the row with softmax(x) - onehot(target), 0 on ignored rows.
Writing the gradient over the logits is what keeps the chunk's memory at one (n, V) buffer: the caller
multiplies it straight into dH = dLogits W and dW += dLogits^T H and then reuses the buffer.
The kernel is not autotuned: benchmarking it would rerun the in-place write on already-overwritten rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _ce_rows(LOGITS, stride_l, TARGETS, LOSS, V, ignore_index, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    t = tl.load(TARGETS + row)
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    valid = t != ignore_index
    x_t = tl.load(base + t, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - x_t, 0.0))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
            g = tl.where(valid, g, 0.0)
            tl.store(base + cols, g.to(LOGITS.dtype.element_ty), mask=cols < V)


def cross_entropy_rows_triton(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                              write_grad: bool) -> torch.Tensor:
    """Row losses (n,) fp32 of logits (n, V); with `write_grad` the logits become softmax - onehot in place."""
    n, V = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy_rows_triton: logits must be contiguous in the vocabulary dim")
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(V), 64 if INTERPRETED else 8192)
    _ce_rows[(n,)](logits, logits.stride(0), targets, loss, V, ignore_index, WRITE_GRAD=write_grad, BLOCK_V=block,
                   num_warps=16 if block >= 8192 else 8)
    return loss
