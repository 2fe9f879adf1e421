"""The GRPO data source for `fit`: each step's rollout (generate, score, log-probs, advantages) as micro-batches.

A rollout covers P = train.batch_size / G prompts, the task's train items at the global prompt position
`prompt_pos` .. +P, and N = P * G samples numbered s = p * G + g. Rank r owns the contiguous block
`my_samples(N, r, W)` (a group may span ranks). Per rollout, every rank:
  1. generates its samples with the KV-cache generator, in chunks of `rl.rollout_batch_size` samples, each
     chunk with its own generator seeded by (train.seed, rollout index, global chunk index): with the default
     chunk = the rank's share that is a seed per (seed, step, rank); with a fixed chunk size the tokens do
     not depend on how the samples are split over ranks (so 2 ranks reproduce 1 process exactly);
  2. scores them with the task reward, all-gathers rewards and completion lengths, and takes its slice of
     the group advantages computed from the whole (N,) vector (identical on every rank);
  3. runs the policy without gradients for the old log-probs (and the entropy statistic), and the frozen
     reference for the reference log-probs when beta > 0;
  4. cuts its samples into micro-batches (x, y, old_logp, ref_logp, adv, weights) for `GRPOLoss`.
With `rl.num_iterations` = mu the same rollout feeds mu consecutive optimizer steps.

Resume: `state_dict()` holds the prompt position, the rollout count and the iteration within the rollout.
Since generation seeds derive from them, a run resumed at a rollout boundary continues exactly like an
uninterrupted run. A checkpoint taken inside a reused rollout (mu > 1 and a step count not a multiple of
mu) cannot restore the old policy's log-probs: the resumed run regenerates that rollout under the current
policy for its remaining iterations and says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist import distributed as D
from llm_dist.config import Config, ConfigError
from llm_dist.rl.grpo import aggregation_weights, group_advantages
from llm_dist.rl.rollout import all_gather_cat, logprobs_from_logits, my_samples, sequence_batch
from llm_dist.rl.tasks import Task
from llm_dist.rl.tasks.base import TaskItem, stable_hash
from llm_dist.reward.model import score_sequences
from llm_dist.sft.chat_format import PROJECT, ChatFormat, chat_format
from llm_dist.sft.evaluate import complete
from llm_dist.tokenizer import Tokenizer
from llm_dist.train.trainer import IGNORE_INDEX, Batch


def chat_prompt(tok: Tokenizer, item: TaskItem, fmt: ChatFormat = PROJECT) -> list[int]:
    """The generation prompt of a task item in chat format `fmt`: one user message, then the assistant header."""
    return fmt.prompt_ids(tok, [{"role": "user", "content": item.prompt}])


@torch.no_grad()
def logprobs_and_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, vocab: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t) (n, T) (0 off target) and the policy entropy at each target position (n, T) (0 off target).

    The log-probs are `token_logprobs`' exactly (log-softmax over the padded logits, as the loss computes
    them, so the first iteration's ratio is 1); the entropy is over the true vocabulary that sampling uses.
    """
    return split_logprobs_entropy(model(x), y, vocab)


def split_logprobs_entropy(logits: torch.Tensor, y: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_and_entropy` from given logits (n, T, V_padded)."""
    logits = logits.float()
    logp = logprobs_from_logits(logits, y)  # (n, T)
    true = F.log_softmax(logits[..., :vocab], dim=-1)  # (n, T, V)
    ent = -(true.exp() * true).sum(-1) * (y != IGNORE_INDEX)
    return logp, ent


def gather_rewards_and_lengths(rewards: torch.Tensor, comps: Sequence[Sequence[int]], device: torch.device
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rewards (n,) and completion lengths, concatenated in sample order: (N,) each on the CPU
    (one all-gather of an (n, 2) tensor)."""
    lengths = torch.tensor([len(c) for c in comps], dtype=torch.float32)
    both = all_gather_cat(torch.stack([rewards.float(), lengths], dim=1).to(device)).cpu()  # (N, 2)
    return both[:, 0].contiguous(), both[:, 1].contiguous()


def timing(t_generate: float, t_score: float, global_tokens: int) -> dict[str, float]:
    """Where a rollout's time went on this rank: sampling, then scoring (rewards, policy/reference/value
    forwards, advantages); gen_tok_per_s = completion tokens of all ranks per second of sampling."""
    return {"time_generate": t_generate, "time_score": t_score, "gen_tok_per_s": global_tokens / max(t_generate, 1e-9)}


@dataclass
class Rollout:
    """One rank's share of a rollout: micro-batches for the trainer and global statistics for logging."""

    micro_batches: list[Batch]
    stats: dict[str, float]


class RolloutSource:
    """`next_batch()` -> this rank's micro-batches of the current GRPO step (see the module docstring)."""

    def __init__(self, cfg: Config, task: Task, tok: Tokenizer, policy: nn.Module, ref: nn.Module | None,
                 stop_id: int, rank: int, world: int, device: torch.device, lockstep: bool = False,
                 reward_model: nn.Module | None = None) -> None:
        self.cfg, self.task, self.tok = cfg, task, tok
        self.fmt = chat_format(cfg.chat.template)  # prompts; stop_id is its end-of-turn token
        self.policy, self.ref = policy, ref  # bare models: generation and no-grad scoring
        self.reward_model = reward_model  # frozen scorer (rl.reward_model); None: the task's reward function
        self.stop_id, self.rank, self.world, self.device, self.lockstep = stop_id, rank, world, device, lockstep
        r, t = cfg.rl, cfg.train
        self.G = r.group_size
        self.N = t.batch_size  # samples per rollout, all ranks
        self.P = self.N // self.G  # prompts per rollout
        self.mine = my_samples(self.N, rank, world)
        self.chunk = r.rollout_batch_size or len(self.mine)
        if len(self.mine) % self.chunk:
            raise ConfigError(f"rl.rollout_batch_size={self.chunk} must divide this rank's {len(self.mine)} samples")
        self.steps_per_rollout = r.num_iterations  # optimizer steps each rollout feeds
        self.prompt_pos = 0  # global: prompts consumed by all finished rollouts
        self.rollouts = 0  # rollouts generated
        self.iteration = 0  # optimizer steps already taken on the current rollout
        self.current: Rollout | None = None
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ the loop API
    def next_batch(self) -> list[Batch]:
        if self.current is None or self.iteration >= self.steps_per_rollout:
            if self.current is not None:  # the previous rollout is used up
                self.prompt_pos += self.P
                self.rollouts += 1
                self.iteration = 0
            self.current = self.make_rollout(self.rollouts, self.prompt_pos)
        batch = self.batch_for(self.current, self.iteration)
        self.iteration += 1
        self.last_stats = self.current.stats
        return batch

    def batch_for(self, rollout: Rollout, iteration: int) -> list[Batch]:
        """This rank's micro-batches for optimizer step `iteration` of a rollout (GRPO: the whole rollout)."""
        return rollout.micro_batches

    def set_global_batch(self, global_batch: int) -> None:
        if global_batch != self.N:
            raise ConfigError("train.batch_ramp_tokens: a batch ramp is not supported by the GRPO stage")

    def state_dict(self) -> dict:
        # A used-up rollout counts as finished, so a resume starts the next one (as the uninterrupted run).
        done = self.current is not None and self.iteration >= self.steps_per_rollout
        return {"prompt_pos": self.prompt_pos + (self.P if done else 0), "rollouts": self.rollouts + int(done),
                "iteration": 0 if done else self.iteration}

    def load_state_dict(self, sd: dict) -> None:
        self.prompt_pos, self.rollouts, self.iteration = sd["prompt_pos"], sd["rollouts"], sd["iteration"]
        self.current = None
        if self.iteration:  # inside a reused rollout: its old policy is gone, regenerate under the current one
            D.warn0(f"resumed inside rollout {self.rollouts} (step {self.iteration} of "
                    f"{self.steps_per_rollout}); regenerating it under the resumed policy")
            self.current = self.make_rollout(self.rollouts, self.prompt_pos)

    # ---------------------------------------------------------------------------------------- rollouts
    def items(self, prompt_pos: int) -> list[TaskItem]:
        """The task item of each of this rank's samples (G consecutive samples share a prompt)."""
        return [self.task.item(prompt_pos + s // self.G, "train") for s in self.mine]

    def generate(self, prompts: Sequence[list[int]], rollout: int) -> list[list[int]]:
        """Sampled completions (ending with stop_id unless cut at max_new_tokens), chunk by chunk."""
        r = self.cfg.rl
        out: list[list[int]] = []
        for c in range(0, len(prompts), self.chunk):
            global_chunk = (self.mine.start + c) // self.chunk  # the same chunk id however ranks split N
            seed = stable_hash("grpo", self.cfg.train.seed, rollout, global_chunk) % 2**63
            g = torch.Generator(device=self.device).manual_seed(seed)
            out += complete(self.policy, prompts[c:c + self.chunk], r.max_new_tokens, temperature=r.temperature,
                            top_k=r.top_k, top_p=r.top_p, stop_id=self.stop_id, generator=g,
                            lockstep=self.lockstep, pad_id=self.stop_id)
        return out

    def score(self, items: Sequence[TaskItem], prompts: Sequence[list[int]], comps: Sequence[list[int]]
              ) -> torch.Tensor:
        """Rewards (n,) fp32: the task's rule on the decoded text, or the reward model read at the closing
        end-of-turn token (appended when the completion ran out of tokens, so every sequence is read at the same token)."""
        if self.reward_model is None:
            texts = [self.tok.decode([i for i in c if i != self.stop_id]) for c in comps]
            return torch.tensor([self.task.reward(t, it) for t, it in zip(texts, items)], dtype=torch.float32)
        seqs = [p + c + ([] if c and c[-1] == self.stop_id else [self.stop_id]) for p, c in zip(prompts, comps)]
        return score_sequences(self.reward_model, seqs, pad_id=self.stop_id,
                               batch_size=self.cfg.train.micro_batch_size)

    def sample(self, rollout: int, prompt_pos: int) -> tuple[list[list[int]], list[list[int]], torch.Tensor, float]:
        """This rank's (prompts, completions, rewards (n,)) of a rollout, and the seconds spent generating."""
        t0 = time.perf_counter()
        items = self.items(prompt_pos)
        prompts = [chat_prompt(self.tok, it, self.fmt) for it in items]
        comps = self.generate(prompts, rollout)
        t_gen = time.perf_counter() - t0
        return prompts, comps, self.score(items, prompts, comps), t_gen

    def make_rollout(self, rollout: int, prompt_pos: int) -> Rollout:
        """Generate, score and prepare this rank's share of rollout `rollout` (collective: all-gathers)."""
        r, mb = self.cfg.rl, self.cfg.train.micro_batch_size
        t0 = time.perf_counter()
        prompts, comps, rewards, t_gen = self.sample(rollout, prompt_pos)
        all_r, all_len = gather_rewards_and_lengths(rewards, comps, self.device)  # (N,) each, sample order
        adv = group_advantages(all_r, self.G, r.scale_rewards)[self.mine.start:self.mine.stop]  # (n_local,)
        n_tok = int(all_len.sum())

        batches: list[Batch] = []
        ent_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on device: no sync per micro-batch
        was_training = self.policy.training
        self.policy.eval()  # old log-probs without dropout, like the sampling that produced the tokens
        for i in range(0, len(prompts), mb):
            x, y = sequence_batch(prompts[i:i + mb], comps[i:i + mb], pad_id=self.stop_id)  # (m, T) each
            x, y = x.to(self.device), y.to(self.device)
            old, ent = logprobs_and_entropy(self.policy, x, y, self.tok.vocab_size)
            ent_sum += ent.double().sum()
            ref = torch.zeros_like(old)
            if self.ref is not None:
                ref, _ = logprobs_and_entropy(self.ref, x, y, self.tok.vocab_size)
            w = aggregation_weights(y != IGNORE_INDEX, self.N, n_tok, r.loss_agg, r.max_new_tokens).to(self.device)
            batches.append((x, y, old, ref, adv[i:i + mb].to(self.device), w))
        self.policy.train(was_training)
        ent_all = D.all_reduce_sum(ent_sum).item()
        group_r = all_r.view(-1, self.G)
        stats = {"reward_mean": all_r.mean().item(), "reward_std": all_r.std().item() if self.N > 1 else 0.0,
                 "solved_groups": (group_r.max(1).values > 0).float().mean().item(),
                 "zero_var_groups": (group_r.std(1) == 0).float().mean().item(),
                 "completion_len": all_len.mean().item(), "entropy": ent_all / max(n_tok, 1),
                 **timing(t_gen, time.perf_counter() - t0 - t_gen, n_tok)}
        return Rollout(batches, stats)
