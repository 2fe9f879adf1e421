"""PPO for language models (Ouyang et al. 2022; Ziegler et al. 2019) as formulas on tensors, and its loss.

A sample is a prompt and a sampled completion of L tokens; tensors are (N, T) in the layout of
`rollout.sequence_batch`, with mask m (N, T) = 1 on the completion tokens (contiguous in each row).
Per completion token t, with the policy's log-prob logp, the frozen reference's ref and the value V_t (the
scalar head at the position that predicts token t, i.e. the state before emitting it):
    kl_t   = logp - ref  (k1)   or   exp(ref - logp) - (ref - logp) - 1  (k3, >= 0)
    r_t    = -kl_coef * kl_t  (+ the sequence's score at its last token)
    delta_t = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0: the episode ends)
    A_t    = delta_t + gamma * lam * A_{t+1}       GAE(gamma, lam); returns R_t = A_t + V_t
    A      <- (A - mean) / std over every completion token of the rollout, all ranks (whitening)
Loss per token, ratio rho = exp(logp_new - logp_old), v = the new value, v_old the rollout-time one:
    pg = max(-A * rho, -A * clip(rho, 1 - c, 1 + c))
    vf = 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c_v, c_v) - R)^2)      (plain 0.5 (v - R)^2 if c_v = 0)
    l  = pg + vf_coef * vf,   averaged over the completion tokens of the global minibatch (the trainer's
                              division by the global target count)
Adaptive KL (Ziegler et al.): kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon after each
rollout of n samples, KL the mean per-sequence sum of kl_t.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llm_dist import distributed as D
from llm_dist.rl.grpo import k3_kl
from llm_dist.rl.rollout import logprobs_from_logits
from llm_dist.train.trainer import IGNORE_INDEX, Batch


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from sampled tokens: k1 = logp - ref, or k3 (same shape)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    raise ValueError(f"kl estimator must be k1 | k3, got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (N, T): -kl_coef * kl on completion tokens, plus score (N,) on each last one."""
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = (m * torch.arange(m.shape[1], device=m.device)).argmax(dim=1)  # (N,) index of the last completion token
    rewards[torch.arange(m.shape[0], device=m.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns (N, T) each, 0 off the completion tokens; inputs (N, T)."""
    m = mask.to(values.dtype)
    v = values * m
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])  # (N,) A_{t+1}
    T = v.shape[1]
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(running)  # 0 past the last completion token
        delta = rewards[:, t] + gamma * next_v - v[:, t]
        running = (delta + gamma * lam * running) * m[:, t]  # resets in the prompt and the padding
        adv[:, t] = running
    return adv, (adv + v) * m


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of x over the mask, float64 (for an all-reduce before whitening)."""
    m = mask.double()
    xd = x.double() * m
    return torch.stack([xd.sum(), (xd * x.double()).sum(), m.sum()])


def whiten(x: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) on the mask (0 elsewhere); moments = global `masked_moments` (unbiased var)."""
    s, ss, n = moments.tolist()
    mean = s / max(n, 1.0)
    var = variance_from_moments(s, ss, n)
    return ((x - mean) / (max(var, 0.0) + eps) ** 0.5) * mask.to(x.dtype)


def explained_variance_moments(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-rank sums for 1 - Var(R - V) / Var(R) over the mask: (moments of R - V, moments of R), (6,)."""
    return torch.cat([masked_moments(returns - values, mask), masked_moments(returns, mask)])


def variance_from_moments(s: float, ss: float, n: float) -> float:
    """Unbiased variance from (sum, sum of squares, count)."""
    mean = s / max(n, 1.0)
    return (ss - n * mean * mean) / max(n - 1.0, 1.0)


def ppo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, values: torch.Tensor,
                   old_values: torch.Tensor, returns: torch.Tensor, cliprange: float, cliprange_value: float,
                   vf_coef: float) -> dict[str, torch.Tensor]:
    """Per-token loss and its parts (all (N, T)): loss, pg, vf, clipped (policy ratio clipped), vf_clipped."""
    ratio = torch.exp(logp - old_logp)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg = torch.maximum(pg1, pg2)
    vf1 = (values - returns) ** 2
    if cliprange_value > 0:
        v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
        vf2 = (v_clip - returns) ** 2
        vf = 0.5 * torch.maximum(vf1, vf2)
        vf_clipped = (vf2 > vf1).float()
    else:
        vf = 0.5 * vf1
        vf_clipped = torch.zeros_like(vf1)
    return {"loss": pg + vf_coef * vf, "pg": pg, "vf": vf, "clipped": (pg2 > pg1).float(), "vf_clipped": vf_clipped,
            "ratio": ratio}


class AdaptiveKL:
    """Ziegler et al.'s proportional controller that moves kl_coef so the observed KL tracks a target."""

    def __init__(self, init: float, target: float, horizon: int, enabled: bool = True) -> None:
        self.value, self.target, self.horizon, self.enabled = init, target, horizon, enabled

    def update(self, kl: float, n_samples: int) -> None:
        """kl: the rollout's mean per-sequence KL; n_samples: the rollout's size."""
        if not self.enabled:
            return
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_samples / self.horizon


class PPOLoss:
    """`loss_fn(model, batch)` for the trainer. batch = (x, y, old_logp, old_values, adv, returns), each (n, T)
    except x/y: inputs and targets (IGNORE_INDEX off the completions), all from the rollout."""

    STATS = ("pg", "vf", "clipped", "vf_clipped", "approx_kl", "ratio", "tokens")

    def __init__(self, cliprange: float, cliprange_value: float, vf_coef: float) -> None:
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.stats = torch.zeros(len(self.STATS), dtype=torch.float64)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, old_logp, old_values, adv, returns = batch
        mask = y != IGNORE_INDEX
        logits, values = model(x, head="both")  # (n, T, V_padded), (n, T)
        logp = logprobs_from_logits(logits, y)  # (n, T)
        parts = ppo_token_loss(logp, old_logp, adv, values, old_values, returns, self.cliprange,
                               self.cliprange_value, self.vf_coef)
        m = mask.float()
        with torch.no_grad():
            log_ratio = logp - old_logp
            approx_kl = torch.exp(-log_ratio) - 1 + log_ratio  # k3 of KL(old || new) per token, >= 0
            self.stats += torch.stack([(parts[k] * m).sum() for k in ("pg", "vf", "clipped", "vf_clipped")]
                                      + [(approx_kl * m).sum(), (parts["ratio"] * m).sum(), m.sum()]).double().cpu()
        return (parts["loss"] * m).sum(), mask.sum()

    def reset_stats(self) -> None:
        self.stats.zero_()

    def step_stats(self, device: torch.device) -> dict[str, float]:
        """Per completion token over every rank's minibatch: pg_loss, value_loss, clip fractions, approx_kl."""
        s = dict(zip(self.STATS, D.all_reduce_sum(self.stats.to(device)).tolist()))
        n = max(s["tokens"], 1.0)
        return {"pg_loss": s["pg"] / n, "value_loss": s["vf"] / n, "clip_frac": s["clipped"] / n,
                "value_clip_frac": s["vf_clipped"] / n, "approx_kl": s["approx_kl"] / n, "ratio": s["ratio"] / n}
