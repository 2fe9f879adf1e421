"""Rollout plumbing: which samples a rank owns, completion batches, token log-probs, all-gathers.

(The GRPO stage calls these per step: `llm_dist/rl/source.py`.)

Sample layout: a step has P prompts x G completions = N samples, numbered s = p * G + g. Rank r owns the
contiguous block s in [r * N / W, (r + 1) * N / W), so one group may span ranks. Rewards (and the
completion lengths the loss aggregation needs) are gathered with `all_gather_single` (plain
tensors, no pickling); the advantages computed from the gathered (N,) vector are therefore the same on
every rank and identical to a one-process run on the same samples.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llm_dist import distributed as D
from llm_dist.train.trainer import IGNORE_INDEX


def my_samples(n_samples: int, rank: int, world: int) -> range:
    """This rank's contiguous block of sample indices (n_samples must divide by world)."""
    if n_samples % world:
        raise ValueError(f"{n_samples} samples cannot be split evenly over {world} ranks")
    per = n_samples // world
    return range(rank * per, (rank + 1) * per)


def sequence_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs x (n, T) and targets y (n, T): y is the completion's tokens at the positions
    that predict them, IGNORE_INDEX elsewhere (prompt and padding). T = longest prompt + completion - 1."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        x[i, : len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(p) - 1: len(s) - 1] = torch.tensor(s[len(p):])
    return x, y


def logprobs_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[y] per target (n, T), 0 where y is IGNORE_INDEX; fp32 (logits (n, T, V_padded))."""
    logp = F.log_softmax(logits.float(), dim=-1)
    out = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (n, T)
    return out * (y != IGNORE_INDEX)


def token_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log pi(y_t | x_<=t) for each target (n, T), 0 where y is IGNORE_INDEX; fp32 log-softmax."""
    return logprobs_from_logits(model(x), y)


def all_gather_cat(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally-shaped tensor along dim 0 in rank order (identity on one process)."""
    if D.get_world_size() == 1:
        return local
    out = torch.empty((D.get_world_size() * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    dist.all_gather_single(out, local.contiguous())
    return out
