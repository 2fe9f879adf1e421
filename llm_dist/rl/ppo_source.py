"""The PPO data source for `fit`: each rollout (generate, score, KL-shaped rewards, values, GAE) feeds
`ppo.epochs` x `ppo.num_minibatches` optimizer steps.

Sampling, the prompt position, the rank layout (rank r owns a contiguous block of the N = train.batch_size
samples) and the generation seeds are the GRPO source's (`llm_dist/rl/source.py`). Per rollout, every rank:
  1. generates its samples and scores them (task reward, or the reward model: `RolloutSource.score`);
  2. runs the policy once without gradients for the old log-probs, the entropy and the old values (the
     scalar head at the same positions), and the frozen reference for its log-probs;
  3. builds per-token rewards (-kl_coef * kl, plus the score at the last token) and GAE advantages and
     returns per sample, then whitens the advantages with the mean and variance of *every* completion token
     of the rollout (one all-reduce of three sums), so the result equals a one-process run;
  4. per optimizer step, takes its share of the minibatch: with one minibatch per epoch its samples in
     order, else a permutation of its own samples seeded by (train.seed, rollout, epoch, rank) (minibatch
     composition then depends on the world size, as in any data-parallel PPO).
The adaptive KL controller updates after each rollout; its value is part of the resumable state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from llm_dist import distributed as D
from llm_dist.config import Config
from llm_dist.rl.ppo import (AdaptiveKL, explained_variance_moments, gae, kl_per_token, masked_moments, token_rewards,
                             variance_from_moments, whiten)
from llm_dist.rl.rollout import logprobs_from_logits, sequence_batch
from llm_dist.rl.source import (Rollout, RolloutSource, gather_rewards_and_lengths, split_logprobs_entropy,
                                timing)
from llm_dist.rl.tasks import Task
from llm_dist.rl.tasks.base import stable_hash
from llm_dist.tokenizer import Tokenizer
from llm_dist.train.trainer import IGNORE_INDEX, Batch


@dataclass
class PPORollout(Rollout):
    """A rollout's per-sample tensors, each row cut to its own length: (x, y, old_logp, old_values, adv, returns)."""

    samples: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def collate(samples: Sequence[tuple[torch.Tensor, ...]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad per-sample rows (T_i,) into (n, T) tensors: x with pad_id, y with IGNORE_INDEX, the rest 0."""
    T = max(s[0].shape[0] for s in samples)
    out = []
    for j, fill in enumerate([pad_id, IGNORE_INDEX, 0, 0, 0, 0]):
        t = torch.full((len(samples), T), fill, dtype=samples[0][j].dtype, device=samples[0][j].device)
        for i, s in enumerate(samples):
            t[i, : s[j].shape[0]] = s[j]
        out.append(t)
    return tuple(out)


class PPOSource(RolloutSource):
    """`next_batch()` -> this rank's micro-batches of the current PPO minibatch (see the module docstring)."""

    def __init__(self, cfg: Config, task: Task, tok: Tokenizer, policy: nn.Module, ref: nn.Module,
                 stop_id: int, rank: int, world: int, device: torch.device, lockstep: bool = False,
                 reward_model: nn.Module | None = None) -> None:
        super().__init__(cfg, task, tok, policy, ref, stop_id, rank, world, device, lockstep, reward_model)
        p = cfg.ppo
        self.steps_per_rollout = p.epochs * p.num_minibatches
        self.kl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon, enabled=p.adaptive_kl)
        self.rollout_kl_coef = p.kl_coef  # the coefficient the current rollout's rewards used

    # ------------------------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": self.kl.value, "rollout_kl_coef": self.rollout_kl_coef}

    def load_state_dict(self, sd: dict) -> None:
        # Inside a rollout, the base class regenerates it: with the coefficient that rollout used.
        self.kl.value = sd["rollout_kl_coef"] if sd["iteration"] else sd["kl_coef"]
        super().load_state_dict(sd)
        self.kl.value = sd["kl_coef"]

    # ------------------------------------------------------------------------------------------ steps
    def batch_for(self, rollout: Rollout, iteration: int) -> list[Batch]:
        assert isinstance(rollout, PPORollout)
        n_mb = self.cfg.ppo.num_minibatches
        epoch, k = divmod(iteration, n_mb)
        n = len(rollout.samples)
        if n_mb == 1:
            order = list(range(n))  # the whole rollout each step: order does not change the gradient
        else:
            g = torch.Generator().manual_seed(stable_hash("ppo", self.cfg.train.seed, self.rollouts, epoch,
                                                          self.rank) % 2**63)
            order = torch.randperm(n, generator=g).tolist()
        per = n // n_mb
        mine = [rollout.samples[i] for i in order[k * per:(k + 1) * per]]
        mb = self.cfg.train.micro_batch_size
        return [collate(mine[i:i + mb], self.stop_id) for i in range(0, len(mine), mb)]

    # ---------------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def make_rollout(self, rollout: int, prompt_pos: int) -> PPORollout:
        """Generate, score and prepare this rank's share of rollout `rollout` (collective: all-reduces)."""
        p, mb = self.cfg.ppo, self.cfg.train.micro_batch_size
        t0 = time.perf_counter()
        prompts, comps, scores, t_gen = self.sample(rollout, prompt_pos)  # scores (n_local,)
        coef = self.kl.value

        chunks = []  # per micro-batch: (x, y, mask, logp, values, adv, returns, kl)
        ent_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on device: no sync per micro-batch
        was_training = self.policy.training
        self.policy.eval()  # no dropout: the same policy that sampled the tokens
        for i in range(0, len(prompts), mb):
            x, y = sequence_batch(prompts[i:i + mb], comps[i:i + mb], pad_id=self.stop_id)  # (m, T) each
            x, y = x.to(self.device), y.to(self.device)
            mask = y != IGNORE_INDEX
            logits, values = self.policy(x, head="both")  # (m, T, V_padded), (m, T)
            logp, ent = split_logprobs_entropy(logits, y, self.tok.vocab_size)
            ent_sum += ent.double().sum()
            ref_logp = logprobs_from_logits(self.ref(x), y)
            kl = kl_per_token(logp, ref_logp, p.kl_estimator) * mask
            rewards = token_rewards(scores[i:i + mb].to(self.device), kl, mask, coef)
            values = values.float() * mask
            adv, ret = gae(rewards, values, mask, p.gamma, p.lam)
            chunks.append((x, y, mask, logp, values, adv, ret, kl))
        self.policy.train(was_training)

        # One all-reduce for every global sum: advantage moments (whitening), explained-variance moments, KL,
        # entropy, values, returns. (Scores and lengths are all-gathered below: their std needs every sample.)
        local = torch.cat([sum(masked_moments(c[5], c[2]) for c in chunks),
                           sum(explained_variance_moments(c[4], c[6], c[2]) for c in chunks),
                           torch.stack([sum(c[7].double().sum() for c in chunks), ent_sum,
                                        sum(c[4].double().sum() for c in chunks),
                                        sum(c[6].double().sum() for c in chunks)])])
        g = D.all_reduce_sum(local).cpu()
        adv_moments, ev, (kl_sum, ent_all, v_sum, r_sum) = g[:3], g[3:9], g[9:].tolist()
        all_scores, all_len = gather_rewards_and_lengths(scores, comps, self.device)  # (N,) each

        samples = []
        for x, y, mask, logp, values, adv, ret, _ in chunks:
            if p.whiten_advantages:
                adv = whiten(adv, mask, adv_moments.to(adv.device))
            for j in range(x.shape[0]):
                T_j = int(mask[j].nonzero().max()) + 1  # the row's own length: up to its last completion token
                samples.append((x[j, :T_j], y[j, :T_j], logp[j, :T_j], values[j, :T_j], adv[j, :T_j], ret[j, :T_j]))

        n_tok = max(adv_moments[2].item(), 1.0)
        kl_seq = kl_sum / self.N  # mean per-sequence KL (what the adaptive controller tracks)
        self.rollout_kl_coef = coef
        self.kl.update(kl_seq, self.N)
        var_r = variance_from_moments(*ev[3:].tolist())
        stats = {"reward_mean": all_scores.mean().item(),
                 "reward_std": all_scores.std().item() if self.N > 1 else 0.0,
                 "completion_len": all_len.mean().item(), "entropy": ent_all / n_tok, "kl": kl_seq,
                 "kl_coef": coef, "value_mean": v_sum / n_tok, "return_mean": r_sum / n_tok,
                 "explained_variance": 1.0 - variance_from_moments(*ev[:3].tolist()) / var_r if var_r > 0 else 0.0,
                 **timing(t_gen, time.perf_counter() - t0 - t_gen, int(all_len.sum()))}
        return PPORollout([], stats, samples)
