"""Direct preference optimisation as formulas on per-sequence log-probs, and its loss for the shared trainer.

Inputs per pair: the policy's and the frozen reference's log-probs of the chosen and the rejected response,
each *summed* over the response tokens (the response and its <|end|>; prompt and padding masked), and the
response lengths n_c, n_r. With pi = policy, ref = reference, beta > 0, label smoothing e:

    sigmoid  h = (pi_c - ref_c) - (pi_r - ref_r)          DPO (Rafailov et al. 2023), e > 0: conservative DPO
             l = -(1 - e) log s(beta h) - e log s(-beta h)  (Mitchell 2023)
    ipo      h as above on length-AVERAGED log-probs       IPO (Azar et al. 2023, eq. 17; beta is their tau)
             l = (h - 1 / (2 beta))^2
    hinge    l = max(0, 1 - beta h)                        SLiC-style hinge (Zhao et al. 2023)
    simpo    h = pi_c / n_c - pi_r / n_r  (no reference)   SimPO (Meng et al. 2024), margin gamma
             l = -(1 - e) log s(beta h - gamma) - e log s(-(beta h - gamma))

Optionally (`dpo.rpo_alpha` = a > 0, RPO: Pang et al. 2024, TRL's `rpo_alpha`) every pair adds a times the
chosen response's NLL per token, -pi_c / n_c: DPO lowers the chosen log-probs too (only the rejected ones
faster), and this anchors them. TRL averages that NLL over all chosen tokens of its batch; here it is each
pair's own token mean, so the term, like the loss, is a mean over pairs and any split over ranks agrees.

These are TRL's formulas: `DPOTrainer.dpo_loss` (sigmoid with label_smoothing, hinge, ipo) and
`CPOTrainer.cpo_loss` with loss_type="simpo" (simpo_gamma / beta subtracted inside beta * (...)). TRL too
length-averages the log-probs for ipo (`concatenated_forward`: all_logps / loss_mask.sum) and for simpo
(CPOTrainer: average_log_prob), and logs those averaged values as logps/*; so do we. Implicit rewards (the
metrics TRL logs): beta * (pi - ref) per response (on the averaged log-probs for ipo), beta * pi for simpo;
rewards/accuracies = share of pairs with reward_c > reward_r (a tie, e.g. at step 0, is not a success).

The trainer divides the summed pair losses by the global number of pairs (y != IGNORE_INDEX over all ranks),
so any split over ranks and micro-batches gives the loss of one process on the whole batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist import distributed as D
from llm_dist.rl.rollout import logprobs_from_logits
from llm_dist.train.trainer import IGNORE_INDEX, Batch

LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FREE = ("simpo",)  # losses that need no reference model


def sequence_logps(logits: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (n,) fp32, target counts (n,)) of each row over its targets != IGNORE_INDEX.

    logits (n, T, V_padded); tgt (n, T). Masked positions contribute exactly 0, whatever their logits.
    """
    logp = logprobs_from_logits(logits, tgt)  # (n, T), 0 where tgt is IGNORE_INDEX
    return logp.sum(dim=1), (tgt != IGNORE_INDEX).sum(dim=1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor, kind: str,
                    beta: float, label_smoothing: float = 0.0, gamma: float = 0.0, rpo_alpha: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, chosen rewards, rejected rewards, chosen logps, rejected logps), all (m,).

    Inputs (m,) each: summed response log-probs (policy and reference), response token counts. The logps
    returned are the ones the loss used (length-averaged for ipo and simpo), as TRL logs them. Computed in
    the inputs' dtype (float64 in, float64 out). The reference inputs are ignored for simpo.
    """
    if kind not in LOSSES:
        raise ValueError(f"dpo loss must be one of {' | '.join(LOSSES)}, got {kind!r}")
    pc, pr, rc, rr = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    nll = -pc / n_chosen.clamp(min=1).to(pc.dtype) if rpo_alpha else 0.0  # (m,) chosen NLL per token
    if kind in ("ipo", "simpo"):  # length-normalised; clamp: a padding pair has no tokens (its loss is masked)
        nc, nr = n_chosen.clamp(min=1).to(pc.dtype), n_rejected.clamp(min=1).to(pc.dtype)
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    if kind == "simpo":
        z = beta * (pc - pr) - gamma
        losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
        return losses + rpo_alpha * nll, beta * pc.detach(), beta * pr.detach(), pc.detach(), pr.detach()
    h = (pc - rc) - (pr - rr)  # (m,) how much more the policy prefers chosen than the reference does
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = F.relu(1 - beta * h)
    return losses + rpo_alpha * nll, beta * (pc - rc).detach(), beta * (pr - rr).detach(), pc.detach(), pr.detach()


class DPOLoss:
    """`loss_fn(model, batch)` for the trainer; batch = (x (2m, T), y (m,), last, margin, tgt (2m, T), ref (2m,))
    from `PairLoader(targets=True)`: chosen rows then rejected rows. The reference log-probs come from
    `reference` (a frozen module, or the LoRA policy with its adapters off, run without gradients on the same rows) or, when it is None, from the
    batch's precomputed `ref` (ignored for simpo). Keeps the step's sums for `step_stats` and evaluation."""

    STATS = ("correct", "margin", "r_chosen", "r_rejected", "logp_chosen", "logp_rejected", "pairs")

    def __init__(self, kind: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                 reference: Callable[[torch.Tensor], torch.Tensor] | None = None, rpo_alpha: float = 0.0) -> None:
        self.kind, self.beta, self.label_smoothing, self.gamma = kind, beta, label_smoothing, gamma
        self.rpo_alpha = rpo_alpha
        self.reference = reference
        self.stats = torch.zeros(len(self.STATS), dtype=torch.float64)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _, _, tgt, ref = batch
        m = y.shape[0]
        logps, n = sequence_logps(model(x), tgt)  # (2m,) each
        if self.reference is not None and self.kind not in REFERENCE_FREE:
            with torch.no_grad():
                ref, _ = sequence_logps(self.reference(x), tgt)  # (2m,)
        losses, rc, rr, lc, lr = preference_loss(logps[:m], logps[m:], ref[:m].to(logps.dtype),
                                                 ref[m:].to(logps.dtype), n[:m], n[m:], self.kind, self.beta,
                                                 self.label_smoothing, self.gamma, self.rpo_alpha)
        valid = (y != IGNORE_INDEX).to(losses.dtype)  # (m,): 0 for padding pairs of an evaluation batch
        with torch.no_grad():
            self.stats += torch.stack([((rc > rr).to(valid.dtype) * valid).sum(), ((rc - rr) * valid).sum(),
                                       (rc * valid).sum(), (rr * valid).sum(), (lc * valid).sum(),
                                       (lr * valid).sum(), valid.sum()]).double().cpu()
        return (losses * valid).sum(), valid.sum()

    def reset_stats(self) -> None:
        self.stats.zero_()

    def step_stats(self, device: torch.device) -> dict[str, float]:
        """TRL's metric names, means over every rank's pairs since the last reset (collective)."""
        s = dict(zip(self.STATS, D.all_reduce_sum(self.stats.to(device)).tolist()))
        n = max(s["pairs"], 1.0)
        return {"rewards/chosen": s["r_chosen"] / n, "rewards/rejected": s["r_rejected"] / n,
                "rewards/accuracies": s["correct"] / n, "rewards/margins": s["margin"] / n,
                "logps/chosen": s["logp_chosen"] / n, "logps/rejected": s["logp_rejected"] / n}

