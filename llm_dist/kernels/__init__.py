"""The project's own Triton kernels: FlashAttention-2 (forward + backward), fused linear + cross-entropy,
fused RMSNorm. See docs/kernels.md for the design.

The entry points here check first whether the kernels can run on the given tensors (Triton installed,
and a CUDA device or Triton's interpreter); when they cannot, they warn once and compute the plain
PyTorch reference instead (`reference.py`). The Triton modules are imported lazily, so this package
imports on machines without Triton. `autotune_mode()` parses LLM_DIST_AUTOTUNE (curated | reduced | full;
see autotune.py) and raises a one-line ValueError on anything else: callers may check it at start-up.
"""

from __future__ import annotations

import math

import torch

from llm_dist.kernels.autotune import autotune_mode
from llm_dist.kernels.backend import interpreted, triton_installed, unsupported_reason, warn_once
from llm_dist.kernels.linear_cross_entropy import auto_chunk_size, linear_cross_entropy_chunked
from llm_dist.kernels.reference import attention_reference, cross_entropy_rows_reference, rms_norm_reference

__all__ = [
    "attention_reference", "auto_chunk_size", "autotune_mode", "cross_entropy_rows_reference", "flash_attention",
    "interpreted",
    "linear_cross_entropy", "rms_norm", "rms_norm_reference", "triton_installed", "unsupported_reason",
]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0,
                    sm_scale: float | None = None) -> torch.Tensor:
    """Attention O (B, H, Tq, D) of q (B, H, Tq, D), k/v (B, Hkv, Tk, D): the Triton FlashAttention kernels.

    causal: bottom-right aligned (query i at key position Tk - Tq + i); window > 0: a query sees only its
    `window` most recent keys. Without Triton: warns once and runs `attention_reference` (O(T^2) memory).
    """
    reason = unsupported_reason(q)
    if reason is not None:
        warn_once("flash_attention", f"flash_attention: Triton kernels unavailable ({reason}); "
                                     "computing the PyTorch reference instead")
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return attention_reference(q, k, v, causal, window, scale)[0]
    from llm_dist.kernels.flash_attention import flash_attention_triton

    return flash_attention_triton(q, k, v, causal, window, sm_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dim (output in x's dtype). Without Triton: warns once, PyTorch reference."""
    reason = unsupported_reason(x)
    if reason is not None:
        warn_once("rms_norm", f"rms_norm: Triton kernel unavailable ({reason}); computing the PyTorch reference instead")
        return rms_norm_reference(x, weight, eps)
    from llm_dist.kernels.rmsnorm import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_size: int = 0) -> torch.Tensor:
    """Summed cross-entropy of (h @ weight.T, targets) computed in chunks (see linear_cross_entropy.py).

    The per-row softmax runs in the Triton kernel where it can, else in PyTorch (one-time warning);
    either way the logits exist one chunk at a time.
    """
    reason = unsupported_reason(h)
    if reason is None:
        from llm_dist.kernels.cross_entropy import cross_entropy_rows_triton as rows
    else:
        warn_once("linear_cross_entropy", f"linear_cross_entropy: Triton kernel unavailable ({reason}); the chunked "
                                          "loss computes its softmax in PyTorch (same memory saving, a little slower)")
        rows = cross_entropy_rows_reference
    return linear_cross_entropy_chunked(h, weight, targets, ignore_index, chunk_size, rows)
