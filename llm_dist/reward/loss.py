"""Reward-model losses on preference pairs, and the pairwise metrics.

A pair's rewards r_c, r_r are the scalar head's output at the last token of the chosen / rejected sequence.
Per pair, with margin m (the row's "margin", else `reward.margin`):
    bradley_terry   -log sigma(r_c - r_r - m)      Bradley & Terry (1952); m > 0 as in Llama 2's RM
    hinge           max(0, m - (r_c - r_r))        margin ranking (torch's MarginRankingLoss)
    + center_coef * (r_c + r_r)^2                  optional centring: the model's rewards are only defined up
                                                   to a constant; this pins their mean near 0 (Eisenstein et al.)
The trainer divides the summed pair losses by the global number of pairs. Metrics: accuracy (share of
pairs with r_c > r_r), margin (mean r_c - r_r), and the mean chosen / rejected rewards.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist import distributed as D
from llm_dist.train.trainer import IGNORE_INDEX, Batch


def pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor, kind: str = "bradley_terry",
              center_coef: float = 0.0) -> torch.Tensor:
    """Per-pair loss (m,) from rewards (m,) each and margins (m,) (see the module docstring)."""
    d = r_chosen - r_rejected
    if kind == "bradley_terry":
        loss = -F.logsigmoid(d - margin)  # stable for large |d|, unlike log(sigmoid(.))
    elif kind == "hinge":
        loss = F.relu(margin - d)
    else:
        raise ValueError(f"reward loss must be bradley_terry | hinge, got {kind!r}")
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss


def last_token_scores(model: nn.Module, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The scalar head at each row's last token: x (n, T), last (n,) -> (n,) fp32."""
    scores = model(x, head="score")  # (n, T)
    return scores.gather(1, last[:, None]).squeeze(1)


class RewardLoss:
    """`loss_fn(model, batch)` for the trainer; batch = (x (2m, T), y (m,), last (2m,), margin (m,)), see
    `llm_dist.reward.data`. Keeps the step's sums for `step_stats` (and for evaluation)."""

    STATS = ("loss", "correct", "margin", "r_chosen", "r_rejected", "pairs")

    def __init__(self, kind: str = "bradley_terry", center_coef: float = 0.0) -> None:
        self.kind, self.center_coef = kind, center_coef
        self.stats = torch.zeros(len(self.STATS), dtype=torch.float64)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, last, margin = batch
        m = y.shape[0]
        r = last_token_scores(model, x, last)  # (2m,)
        rc, rr = r[:m], r[m:]
        valid = (y != IGNORE_INDEX).float()  # (m,): 0 for padding pairs of an evaluation batch
        loss = pair_loss(rc, rr, margin.float(), self.kind, self.center_coef) * valid
        with torch.no_grad():
            self.stats += torch.stack([loss.sum(), ((rc > rr).float() * valid).sum(), ((rc - rr) * valid).sum(),
                                       (rc * valid).sum(), (rr * valid).sum(), valid.sum()]).double().cpu()
        return loss.sum(), valid.sum()

    def reset_stats(self) -> None:
        self.stats.zero_()

    def step_stats(self, device: torch.device) -> dict[str, float]:
        """accuracy, margin and mean rewards over every rank's pairs since the last reset (collective)."""
        s = dict(zip(self.STATS, D.all_reduce_sum(self.stats.to(device)).tolist()))
        n = max(s["pairs"], 1.0)
        return {"accuracy": s["correct"] / n, "margin": s["margin"] / n,
                "reward_chosen": s["r_chosen"] / n, "reward_rejected": s["r_rejected"] / n}
