"""The RL stages, GRPO and PPO: the policy from an SFT/pretrain checkpoint, rollouts on every rank, the
algorithm's loss on the shared trainer.

`run_rl(cfg, algo)` follows the SFT stage's wiring: runtime -> tokenizer (the checkpoint's, with the chat
tokens) -> task (+ the reward model when rl.reward_model is set) -> policy (architecture and weights from
`rl.init_from`; PPO adds the value head on the same backbone) -> frozen reference (GRPO: only when
beta > 0; PPO: always, for the KL penalty) -> trainer with `GRPOLoss` / `PPOLoss` -> resume (policy, value
head, optimizer, counters, RNG, prompt position, KL coefficient) -> `fit` over the rollout source with
greedy held-out accuracy as the evaluation -> checkpoints through the same manager.

Logged per step besides the trainer's loss/lr/grad norm (all reduced over ranks): reward_mean/std,
completion_len, entropy (policy entropy per completion token at rollout time), time_generate / time_score /
gen_tok_per_s (where the rollout's time went), and
  GRPO: solved_groups (share of groups with some reward), zero_var_groups (groups that give no gradient),
        kl (k3 to the reference per completion token), clip_frac, ratio (mean pi / pi_old);
  PPO:  kl (mean per-sequence KL to the reference), kl_coef, pg_loss, value_loss, clip_frac,
        value_clip_frac, approx_kl (old -> new policy), ratio, explained_variance, value_mean, return_mean.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from llm_dist import distributed as D
from llm_dist.config import Config, ConfigError, LoRAConfig
from llm_dist.distributed import world_size_from_env
from llm_dist.model.transformer import build_model, model_summary
from llm_dist.parallel import build_parallel_model
from llm_dist.reward.model import check_same_tokenizer, load_reward_model
from llm_dist.rl.grpo import GRPOLoss
from llm_dist.rl.ppo import PPOLoss
from llm_dist.rl.ppo_source import PPOSource
from llm_dist.rl.source import RolloutSource, chat_prompt
from llm_dist.rl.tasks import Task, get_task
from llm_dist.sft.chat_format import PROJECT, ChatFormat, chat_format
from llm_dist.sft.evaluate import exact_match
from llm_dist.stages import (RunResult, check_chat_format, checkpoint_saver, init_from_checkpoint,
                             open_checkpoints, resolve_checkpoint_url, run_fit, setup_chat_model,
                             stage_runtime, stage_throughput, write_run_config)
from llm_dist.tokenizer import Tokenizer
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.trainer import Batch, Trainer, resolve_dtype


class RLTrainer(Trainer):
    """The shared trainer; each step's metrics also carry the rollout's and the loss's statistics."""

    source: RolloutSource | None = None

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        metrics = super().train_step(micro_batches)  # with GRPOLoss.step_stats: kl, clip_frac, ratio
        if self.source is not None:
            metrics.update(self.source.last_stats)
        return metrics


def build_reference(cfg: Config, url: str | None, device: torch.device) -> nn.Module:
    """The frozen reference policy (bare, unsharded, eval mode, no gradients): the init checkpoint's weights,
    or, without one, the same seeded initialisation the policy got (so it is the initial policy either way)."""
    # The value head is not part of the policy; nor are LoRA adapters (zero at the start: the reference is the base).
    mcfg = dataclasses.replace(cfg.model, score_head=False, lora=LoRAConfig())
    if url is None:
        ref = build_model(mcfg, "cpu", seed=cfg.train.seed)
    else:
        ref = build_model(mcfg, "cpu")
        init_from_checkpoint(ref, url, mcfg.vocab_size)
    return ref.to(device).eval().requires_grad_(False)


def accuracy_items(task: Task, tok: Tokenizer, n: int, fmt: ChatFormat = PROJECT) -> list[tuple[list[int], str]]:
    """(prompt ids in chat format `fmt`, reference answer) of the first n held-out problems."""
    total = task.num_items("eval")
    return [(chat_prompt(tok, it, fmt), it.answer) for it in task.items("eval", min(n, total) if total else n)]


def check_batch(cfg: Config, world_size: int, algo: str = "grpo") -> None:
    """The rollout layout: train.batch_size is whole groups, rollout chunks divide each rank's share, and
    (PPO) each rank's share splits into ppo.num_minibatches minibatches of whole micro-batches."""
    r, t = cfg.rl, cfg.train
    if t.batch_size % r.group_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of rl.group_size={r.group_size} "
                          "(a step's samples are whole groups)")
    share = t.batch_size // world_size
    if r.rollout_batch_size and share % r.rollout_batch_size:
        raise ConfigError(f"rl.rollout_batch_size={r.rollout_batch_size} must divide each rank's share of "
                          f"train.batch_size ({t.batch_size} / {world_size} ranks = {share})")
    n_mb = cfg.ppo.num_minibatches
    if algo == "ppo" and (share % n_mb or (share // n_mb) % t.micro_batch_size):
        raise ConfigError(f"ppo.num_minibatches={n_mb}: each rank's share of train.batch_size ({share}) must "
                          f"split into {n_mb} minibatches of whole micro-batches "
                          f"(train.micro_batch_size={t.micro_batch_size})")


def main(cfg: Config) -> RunResult:
    """Run GRPO; returns the run directory, last metrics and exit code (0, EXIT_REQUEUE after a scheduler
    signal, EXIT_NONFINITE)."""
    return run_rl(cfg, "grpo")


def ppo_main(cfg: Config) -> RunResult:
    """Run PPO; returns the run directory, last metrics and exit code (0, EXIT_REQUEUE after a scheduler
    signal, EXIT_NONFINITE)."""
    return run_rl(cfg, "ppo")


def run_rl(cfg: Config, algo: str) -> RunResult:
    """The GRPO or PPO stage (see the module docstring)."""
    r, t = cfg.rl, cfg.train
    check_batch(cfg, world_size_from_env(), algo)  # before any process group or file
    try:
        task = get_task(r.task, r.task_level, r.task_seed, r.data_dir)
    except (ValueError, OSError) as e:  # unknown task, missing GSM8K files: one line
        raise ConfigError(f"rl.task: {e}") from None
    with stage_runtime(cfg) as rt:
        out_dir = Path(cfg.out_dir)
        cfg.model.score_head = algo == "ppo"  # PPO's value head shares the policy's backbone
        tok, init_url = setup_chat_model(cfg, r.init_from)
        fmt = chat_format(cfg.chat.template)
        end_id = fmt.end_id(tok)
        rm = None
        if r.reward_model:
            rm, rm_tok = load_reward_model(r.reward_model, rt.device)
            check_same_tokenizer(tok, rm_tok, r.reward_model)
            check_chat_format(resolve_checkpoint_url(r.reward_model), rm_tok, fmt.name, "rl.reward_model")
        amp_dtype = resolve_dtype(t.dtype, rt.device)
        pm = build_parallel_model(cfg, rt, amp_dtype)
        D.print0(f"{rt.world_size} rank(s) on {rt.device}, strategy {pm.strategy}; {model_summary(pm.model)}")
        if algo == "ppo":
            p = cfg.ppo
            loss = PPOLoss(p.cliprange, p.cliprange_value, p.vf_coef)
            ref = build_reference(cfg, init_url, rt.device)
            source: RolloutSource = PPOSource(cfg, task, tok, pm.model, ref, end_id, rt.rank, rt.world_size,
                                              rt.device, lockstep=pm.sharded, reward_model=rm)
            what = (f"kl {p.kl_estimator} x {p.kl_coef}{' (adaptive)' if p.adaptive_kl else ''}, GAE({p.gamma}, "
                    f"{p.lam}), {p.epochs} epoch(s) x {p.num_minibatches} minibatch(es) per rollout")
        else:
            loss = GRPOLoss(r.epsilon_low, r.epsilon_high, r.beta, r.num_iterations)
            ref = build_reference(cfg, init_url, rt.device) if r.beta > 0 and init_url else None
            source = RolloutSource(cfg, task, tok, pm.model, ref, end_id, rt.rank, rt.world_size, rt.device,
                                   lockstep=pm.sharded, reward_model=rm)
            what = (f"beta {r.beta}{' (no reference model)' if ref is None else ''}, loss {r.loss_agg}, "
                    f"{r.num_iterations} iteration(s) per rollout")
        trainer = RLTrainer(cfg, rt, pm, loss_fn=loss, amp_dtype=amp_dtype)
        trainer.source = source
        ckpt, resumed = open_checkpoints(cfg, trainer, out_dir, lambda ts: source.load_state_dict(ts["rollout"]),
                                         init_url, tokenizer=tok)
        D.print0(f"{algo}: task {task.name} (level {r.task_level}), {source.P} prompts x G={source.G} per rollout, "
                 f"rewards from {r.reward_model or 'the task'}; {what}")
        write_run_config(cfg, out_dir)
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        seq_len = cfg.model.block_size
        throughput = stage_throughput(cfg, rt, pm.model, amp_dtype, seq_len)
        items = accuracy_items(task, tok, r.eval_examples, fmt) if r.eval_examples else []
        mode = "gsm8k" if r.task == "gsm8k" else "exact"

        save = checkpoint_saver(ckpt, trainer, cfg, tok, tok.name, pm.strategy,
                                lambda: {"rollout": source.state_dict()}, stage=algo)

        def evaluate() -> dict[str, float]:
            acc, replies = exact_match(pm.model, tok, items, mode, r.max_new_tokens, r.eval_batch_size, end_id,
                                       lockstep=pm.sharded)
            if replies:
                D.print0(f"  e.g. {task.item(0, 'eval').prompt[:60]!r} -> {replies[0][:80]!r}")
            return {"val/accuracy": acc}

        if resumed is None and items:  # the starting point, for before/after comparisons
            logger.log(0, evaluate(), prefix="eval  ")
        return run_fit(trainer, source, ckpt, logger, algo, out_dir, save, throughput=throughput,
                       evaluate=evaluate if items else None, seq_len=seq_len)
