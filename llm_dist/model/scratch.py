"""From-scratch versions of the ops a transformer is trained with (`model.ops: scratch`), to read and to learn.

Each op writes its forward *and* its backward by hand as a `torch.autograd.Function` (autograd only
chains them together), and each is held equal to its torch counterpart, values and gradients, by
tests/model/test_scratch.py:

    Linear         y = x W^T + b                  dx = dy W,  dW = dy^T x,  db = sum(dy)
    Embedding      y = W[idx]                     dW[i] = sum of dy over the positions where idx == i
    softmax        y = exp(x - max) / sum         dx = y * (dy - sum(dy * y))
    cross_entropy  l = logsumexp(z) - z[t]        dz = softmax(z) - onehot(t)   (rows with t == ignore: 0)
    AdamW          decoupled weight decay + bias-corrected first/second moments (Loshchilov & Hutter 2019)
    clip_grad_norm_  g *= min(1, max_norm / (||g||_2 + 1e-6)) over all gradients together

Only plain tensor arithmetic is used (matmul, exp, log, sum, index_add). The torch path stays the default:
these are slower (no fused kernels) and exist so that every step of training can be read in one file.
Under autocast, Linear computes in the autocast dtype like `nn.Linear` and returns gradients in each
input's own dtype (autograd.Function backwards do not run under autocast).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul runs in: autocast's lower precision if active, else the input's."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# ------------------------------------------------------------------------------------------------ linear


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dt = _compute_dtype(x)
        xc, wc = x.to(dt), weight.to(dt)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        y = xc @ wc.t()  # (..., in) @ (in, out) -> (..., out)
        return y + bias.to(dt) if bias is not None else y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xc, wc = ctx.saved_tensors
        x_dt, w_dt, b_dt = ctx.dtypes
        gy = gy.to(wc.dtype)
        gx = (gy @ wc).to(x_dt)  # (..., out) @ (out, in) -> (..., in)
        g2 = gy.reshape(-1, gy.shape[-1])  # (N, out): every leading dim is a batch dim
        gw = (g2.t() @ xc.reshape(-1, xc.shape[-1])).to(w_dt)  # (out, N) @ (N, in) -> (out, in)
        gb = g2.sum(0).to(b_dt) if b_dt is not None else None
        return gx, gw, gb


class Linear(nn.Module):
    """Drop-in for `nn.Linear` (same `weight` (out, in) and `bias` (out,)); initialised by the model."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default (Kaiming-uniform bound 1/sqrt(in)); the transformer re-initialises anyway.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# --------------------------------------------------------------------------------------------- embedding


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.num = weight.shape[0]
        return weight[idx]  # (..., dim): a row lookup

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (idx,) = ctx.saved_tensors
        # Rows that occur several times accumulate every occurrence's gradient.
        gw = torch.zeros(ctx.num, gy.shape[-1], dtype=gy.dtype, device=gy.device)
        gw.index_add_(0, idx.reshape(-1), gy.reshape(-1, gy.shape[-1]))
        return None, gw


class Embedding(nn.Module):
    """Drop-in for `nn.Embedding` (same `weight` (num, dim))."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        with torch.no_grad():
            self.weight.normal_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _EmbeddingFn.apply(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ---------------------------------------------------------------------------------------------- softmax


class _SoftmaxFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        # Subtracting the max changes nothing mathematically and keeps exp() from overflowing.
        # Masked entries are -inf: exp(-inf) = 0. Every row must keep at least one finite entry.
        e = torch.exp(x - x.amax(dim=dim, keepdim=True))
        y = e / e.sum(dim=dim, keepdim=True)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (y,) = ctx.saved_tensors
        # Jacobian diag(y) - y y^T applied to gy, without forming it.
        return y * (gy - (gy * y).sum(dim=ctx.dim, keepdim=True)), None


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Hand-written softmax along `dim` (same signature shape as `F.softmax(x, dim)`)."""
    return _SoftmaxFn.apply(x, dim)


# ---------------------------------------------------------------------------------------- cross-entropy


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, mean: bool) -> torch.Tensor:
        valid = target != ignore_index  # (N,)
        safe_t = torch.where(valid, target, torch.zeros_like(target))  # ignored rows index column 0, then drop
        m = logits.amax(dim=-1, keepdim=True)  # (N, 1)
        shifted = logits - m
        lse = torch.log(torch.exp(shifted).sum(dim=-1))  # (N,) logsumexp - m
        picked = shifted.gather(-1, safe_t[:, None]).squeeze(-1)  # (N,) z[t] - m
        per_row = torch.where(valid, lse - picked, torch.zeros_like(lse))  # (N,)
        n = valid.sum()
        ctx.save_for_backward(shifted, lse, safe_t, valid, n)
        ctx.mean = mean
        total = per_row.sum()
        return total / n.clamp(min=1) if mean else total

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        shifted, lse, safe_t, valid, n = ctx.saved_tensors
        probs = torch.exp(shifted - lse[:, None])  # (N, V): softmax(z)
        grad = probs.scatter_add(-1, safe_t[:, None], -torch.ones_like(lse)[:, None])  # softmax - onehot
        grad = grad * valid[:, None]
        scale = g / n.clamp(min=1) if ctx.mean else g
        return grad * scale, None, None, None


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """Hand-written `F.cross_entropy` for logits (N, V), targets (N,); reduction 'sum' or 'mean' (over kept rows)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return _CrossEntropyFn.apply(logits, target, ignore_index, reduction == "mean")


# -------------------------------------------------------------------------------------------- optimizer


class AdamW(torch.optim.Optimizer):
    """AdamW written out: per parameter, with step t, gradient g, moments m and v,

        p <- p - lr * wd * p                                     (decoupled weight decay)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    A `torch.optim.Optimizer`, so param groups, `state_dict()` and schedulers work as for torch's AdamW
    (the state uses the same keys: step, exp_avg, exp_avg_sq).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - the torch.optim.Optimizer signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = float(st["step"])
                g, m, v = p.grad, st["exp_avg"], st["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                m_hat = m / (1 - b1 ** t)
                v_hat = v / (1 - b2 ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        return loss


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before clipping.

    The norm is accumulated in float32 (float64 for float64 grads): a sum of squares over millions of
    bf16 entries would lose most of its precision.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    total = torch.zeros((), dtype=acc, device=grads[0].device)
    for g in grads:
        total += (g.to(acc) ** 2).sum()
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # <= 1: never scales gradients up
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return norm


def cross_entropy_for(model: nn.Module):  # noqa: ANN201 - returns F.cross_entropy or cross_entropy
    """The cross-entropy matching a (possibly wrapped) model's `model.ops`: torch's, or the hand-written one."""
    for m in model.modules():
        cfg = getattr(m, "cfg", None)
        if cfg is not None and hasattr(cfg, "ops"):
            return cross_entropy if cfg.ops == "scratch" else torch.nn.functional.cross_entropy
    return torch.nn.functional.cross_entropy
