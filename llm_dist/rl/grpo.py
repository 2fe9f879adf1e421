"""GRPO (Shao et al. 2024, DeepSeekMath) as formulas on tensors, and its loss for the shared trainer.

Advantages, G completions per prompt, rewards r (N,) with N = prompts * G in group order:
    A_i = (r_i - mean_group(r)) / (std + eps)     std: of the group (scale_rewards=group, unbiased as in
                                                  TRL), of the whole batch (batch), or 1 (none: Dr. GRPO)
A zero-variance group (all completions equally good) gives A = 0 exactly: no NaN, no update from it.

Per completion token t of sequence i, ratio rho = exp(logp - logp_old):
    l_it = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3_it
    k3_it = exp(ref - logp) - (ref - logp) - 1    (Schulman's k3 estimator of KL(pi || ref), >= 0)
Aggregation over the *global* batch (all ranks), mask m_it = 1 on completion tokens:
    grpo     (1 / N) * sum_i (sum_t m l / sum_t m)      per-sequence mean, then mean over sequences
    dr_grpo  sum_it m l / (N * max_len)                   a constant normaliser (no length bias)
    dapo     sum_it m l / sum_it m                        token-level mean
The trainer divides each step's summed loss by the global number of target tokens (sum_it m); so each
token's loss is pre-multiplied by a weight w_it (`aggregation_weights`) that turns that division into the
chosen aggregation: w = n_tok / (N * L_i) for grpo, n_tok / (N * max_len) for dr_grpo, 1 for dapo.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llm_dist import distributed as D
from llm_dist.rl.rollout import token_logprobs
from llm_dist.train.trainer import IGNORE_INDEX, Batch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards (N,) in group order (G consecutive samples per prompt) -> advantages (N,)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of {group_size}")
    r = rewards.double().view(-1, group_size)  # (P, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True)  # (P, 1), unbiased
    elif scale == "batch":
        std = r.std().expand_as(centred[:, :1])
    elif scale == "none":
        std = torch.ones_like(centred[:, :1])
        eps = 0.0
    else:
        raise ValueError(f"scale_rewards must be group | batch | none, got {scale!r}")
    return (centred / (std + eps)).view(-1).to(rewards.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (same shape)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float,
                    ref_logp: torch.Tensor | None = None, beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss l (N, T) and the clipped indicator (N, T); logp/old/ref (N, T), adv (N,)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    loss = -torch.minimum(unclipped, clipped)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        loss = loss + beta * k3_kl(logp, ref_logp)
    return loss, (clipped < unclipped).float()


def aggregation_weights(mask: torch.Tensor, n_seq: int, n_tok: int, agg: str, max_len: int) -> torch.Tensor:
    """Weights (N_local, T) so that sum(w * l * mask) / n_tok is the `agg` loss over the global batch.

    mask (N_local, T) bool completion tokens of this rank; n_seq, n_tok: sequences and completion tokens
    of the whole global batch (all ranks).
    """
    m = mask.double()
    if agg == "dapo":
        w = torch.ones_like(m)
    elif agg == "grpo":
        w = (n_tok / (n_seq * m.sum(dim=1, keepdim=True).clamp(min=1))).expand_as(m)
    elif agg == "dr_grpo":
        w = torch.full_like(m, n_tok / (n_seq * max_len))
    else:
        raise ValueError(f"loss aggregation must be grpo | dr_grpo | dapo, got {agg!r}")
    return (w * m).float()


class GRPOLoss:
    """`loss_fn(model, batch)` for the trainer. batch = (x, y, old_logp, ref_logp, adv, weights):
    x, y (n, T) inputs / targets (IGNORE_INDEX off the completions), log-probs (n, T) (ref all-zero when
    beta = 0), adv (n,), weights (n, T) from `aggregation_weights`."""

    def __init__(self, eps_low: float, eps_high: float, beta: float, num_iterations: int) -> None:
        self.eps_low, self.eps_high, self.beta = eps_low, eps_high, beta
        self.num_iterations = num_iterations
        self.stats = torch.zeros(4, dtype=torch.float64)  # this step: sum(m*kl), sum(m*clipped), sum(m*ratio), sum(m)

    def reset_stats(self) -> None:
        self.stats.zero_()

    def step_stats(self, device: torch.device) -> dict[str, float]:
        """The step's kl, clip fraction and mean ratio per completion token, over every rank (collective)."""
        s = D.all_reduce_sum(self.stats.to(device)).tolist()
        n = max(s[3], 1.0)
        return {"kl": s[0] / n, "clip_frac": s[1] / n, "ratio": s[2] / n}

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, old, ref, adv, w = batch
        mask = y != IGNORE_INDEX
        logp = token_logprobs(model, x, y)  # (n, T)
        # One iteration: the old policy *is* this policy (ratio 1, gradient of rho*A = A * grad logp), and
        # taking it from this forward avoids any float mismatch with the rollout-time forward.
        old = logp.detach() if self.num_iterations == 1 else old
        loss, clipped = grpo_token_loss(logp, old, adv, self.eps_low, self.eps_high, ref, self.beta)
        m = mask.float()
        with torch.no_grad():
            kl = k3_kl(logp, ref) if self.beta != 0.0 else torch.zeros_like(logp)
            self.stats += torch.stack([(kl * m).sum(), (clipped * m).sum(), (torch.exp(logp - old) * m).sum(),
                                       m.sum()]).double().cpu()
        return (loss * w * m).sum(), mask.sum()
