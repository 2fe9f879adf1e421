"""Plain-PyTorch references of every kernel in this package: the test oracles and the CPU fallbacks.

Each has exactly the semantics of its kernel (the same masks, dtypes and reductions), computed the
obvious way, materialising whatever the kernel avoids. Nothing here imports Triton.
"""

from __future__ import annotations

import math

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, window: int = 0,
                        sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention with the kernel's semantics: (O in q's dtype, natural-log LSE (B, H, Tq) fp32+).

    Materialises the (Tq, Tk) scores in fp32 (float64 stays float64): the test oracle and the fallback.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(wide).view(B, Hkv, H // Hkv, Tq, D)  # (B, Hkv, G, Tq, D): groups read their K/V head in place
    s = qg @ k.to(wide).unsqueeze(2).transpose(-2, -1) * scale  # (B, Hkv, G, Tq, Tk)
    q_pos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    k_pos = torch.arange(Tk, device=q.device)[None, :]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        keep &= k_pos <= q_pos
    if window:
        keep &= q_pos - k_pos < window
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G, Tq)
    o = torch.softmax(s, dim=-1) @ v.to(wide).unsqueeze(2)  # (B, Hkv, G, Tq, D)
    return o.reshape(B, H, Tq, D).to(q.dtype), lse.reshape(B, H, Tq)



def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32 (float64 stays float64), cast back to x's dtype.

    The same arithmetic as `llm_dist.model.layers.RMSNorm`.
    """
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(wide)  # (..., C)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.to(wide)).to(x.dtype)


def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                 write_grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (n,) fp32 of logits (n, V); ignored rows give 0.

    With `write_grad`, logits are overwritten in place by d(sum of row losses)/d(logits) =
    softmax(logits) - onehot(target), zero on ignored rows: the contract of the Triton row kernel.
    """
    lf = logits.float() if logits.dtype != torch.float64 else logits  # (n, V)
    valid = targets != ignore_index  # (n,)
    tgt = targets.clamp(min=0)[:, None]  # (n, 1); ignored rows read column 0, then are zeroed
    lse = torch.logsumexp(lf, dim=-1)  # (n,)
    loss = torch.where(valid, lse - lf.gather(1, tgt).squeeze(1), torch.zeros_like(lse))
    if write_grad:
        grad = torch.exp(lf - lse[:, None])  # (n, V) softmax
        grad.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=grad.dtype))
        grad.mul_(valid[:, None])
        logits.copy_(grad)
    return loss
