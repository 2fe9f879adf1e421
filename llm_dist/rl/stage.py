"""GRPO stage: the policy from an SFT/pretrain checkpoint, rollouts on every rank, the GRPO loss on the shared trainer.

`main(cfg)` follows the SFT stage's wiring: runtime -> tokenizer (the checkpoint's, with the chat tokens)
-> task -> policy (architecture and weights from `rl.init_from`) -> frozen reference (only when beta > 0)
-> trainer with `GRPOLoss` -> resume (policy, optimizer, counters, RNG, prompt position) -> `fit` over a
`RolloutSource` with greedy held-out accuracy as the evaluation -> checkpoints through the same manager.

Logged per step besides the trainer's loss/lr/grad norm (all reduced over ranks): reward_mean/std,
solved_groups (share of groups with some reward), zero_var_groups (groups that give no gradient),
completion_len, entropy (policy entropy per completion token at rollout time), kl (k3 to the reference,
per completion token), clip_frac (share of tokens whose ratio was clipped), ratio (mean pi / pi_old).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from llm_dist import distributed as D
from llm_dist.checkpoint import load_checkpoint_tokenizer
from llm_dist.config import Config, ConfigError
from llm_dist.distributed import world_size_from_env
from llm_dist.model.transformer import build_model, model_summary
from llm_dist.parallel import build_parallel_model
from llm_dist.rl.grpo import GRPOLoss
from llm_dist.rl.source import RolloutSource, chat_prompt
from llm_dist.rl.tasks import Task, get_task
from llm_dist.sft.chat import END, add_chat_tokens
from llm_dist.sft.evaluate import exact_match
from llm_dist.stages import (build_tokenizer, checkpoint_model_config, init_from_checkpoint, open_checkpoints,
                             resolve_checkpoint_url, resolve_vocab, run_fit, write_run_config)
from llm_dist.tokenizer import Tokenizer
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.throughput import Throughput, peak_flops
from llm_dist.train.trainer import Batch, Trainer, resolve_dtype


class GRPOTrainer(Trainer):
    """The shared trainer; each step's metrics also carry the rollout's and the loss's statistics."""

    source: RolloutSource | None = None

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        loss: GRPOLoss = self.loss_fn  # type: ignore[assignment]
        loss.stats.zero_()
        metrics = super().train_step(micro_batches)
        s = D.all_reduce_sum(loss.stats.to(self.rt.device)).tolist()  # [kl*m, clipped*m, ratio*m, m] summed
        n = max(s[3], 1.0)
        metrics.update({"kl": s[0] / n, "clip_frac": s[1] / n, "ratio": s[2] / n})
        if self.source is not None:
            metrics.update(self.source.last_stats)
        return metrics


def setup_tokenizer_and_model(cfg: Config) -> tuple[Tokenizer, str | None]:
    """The chat tokenizer and the init checkpoint URL (None: random init).

    With rl.init_from the tokenizer and architecture are the checkpoint's (cfg.model is replaced; the
    vocabulary grows by the chat tokens if the checkpoint is a pretraining one without them).
    """
    url = resolve_checkpoint_url(cfg.rl.init_from) if cfg.rl.init_from else None
    if url is None:
        tok = add_chat_tokens(build_tokenizer(cfg))
        resolve_vocab(cfg, tok)
        return tok, None
    tok = add_chat_tokens(load_checkpoint_tokenizer(url))
    saved = checkpoint_model_config(url)
    saved.vocab_size = max(saved.vocab_size, tok.vocab_size)
    saved.dropout = cfg.model.dropout  # RL chooses its own dropout (normally 0: ratios need a stable policy)
    cfg.model = saved
    return tok, url


def build_reference(cfg: Config, url: str, device: torch.device) -> nn.Module:
    """The frozen reference policy: the init checkpoint's weights, eval mode, no gradients (bare, unsharded)."""
    ref = build_model(cfg.model, "cpu")
    init_from_checkpoint(ref, url, cfg.model.vocab_size)
    ref.to(device).eval().requires_grad_(False)
    return ref


def accuracy_items(task: Task, tok: Tokenizer, n: int) -> list[tuple[list[int], str]]:
    """(prompt ids, reference answer) of the first n held-out problems."""
    total = task.num_items("eval")
    return [(chat_prompt(tok, it), it.answer) for it in task.items("eval", min(n, total) if total else n)]


def check_batch(cfg: Config, world_size: int) -> None:
    """The GRPO batch layout: train.batch_size is whole groups, and rollout chunks divide each rank's share."""
    r, t = cfg.rl, cfg.train
    if t.batch_size % r.group_size:
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of rl.group_size={r.group_size} "
                          "(a step's samples are whole groups)")
    share = t.batch_size // world_size
    if r.rollout_batch_size and share % r.rollout_batch_size:
        raise ConfigError(f"rl.rollout_batch_size={r.rollout_batch_size} must divide each rank's share of "
                          f"train.batch_size ({t.batch_size} / {world_size} ranks = {share})")


def main(cfg: Config) -> int:
    """Run GRPO; returns the process exit code (0, EXIT_REQUEUE after a scheduler signal, EXIT_NONFINITE)."""
    r, t = cfg.rl, cfg.train
    check_batch(cfg, world_size_from_env())  # before any process group or file
    try:
        task = get_task(r.task, r.task_level, r.task_seed, r.data_dir)
    except (ValueError, OSError) as e:  # unknown task, missing GSM8K files: one line
        raise ConfigError(f"rl.task: {e}") from None
    with D.runtime(cfg.parallel.device, cfg.parallel.backend) as rt:
        out_dir = Path(cfg.out_dir)
        tok, init_url = setup_tokenizer_and_model(cfg)
        end_id = tok.special_tokens[END]
        amp_dtype = resolve_dtype(t.dtype, rt.device)
        pm = build_parallel_model(cfg, rt, amp_dtype)
        D.print0(f"{rt.world_size} rank(s) on {rt.device}, strategy {pm.strategy}; {model_summary(pm.model)}")
        loss = GRPOLoss(r.epsilon_low, r.epsilon_high, r.beta, r.num_iterations)
        trainer = GRPOTrainer(cfg, rt, pm, loss_fn=loss, amp_dtype=amp_dtype)
        ref = build_reference(cfg, init_url, rt.device) if r.beta > 0 and init_url else None
        source = RolloutSource(cfg, task, tok, pm.model, ref, end_id, rt.rank, rt.world_size, rt.device,
                               lockstep=pm.sharded)
        trainer.source = source
        ckpt, resumed = open_checkpoints(cfg, trainer, out_dir, lambda ts: source.load_state_dict(ts["rollout"]),
                                         init_url)
        D.print0(f"grpo: task {task.name} (level {r.task_level}), {source.P} prompts x G={source.G} per step, "
                 f"beta {r.beta}{' (no reference model)' if ref is None else ''}, loss {r.loss_agg}, "
                 f"{r.num_iterations} iteration(s) per rollout")
        write_run_config(cfg, out_dir)
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
        seq_len = cfg.model.block_size
        throughput = Throughput(pm.model.flops_per_token(seq_len), peak_flops(rt.device, amp, cfg.logging.peak_tflops), rt.world_size)
        items = accuracy_items(task, tok, r.eval_examples) if r.eval_examples else []
        mode = "gsm8k" if r.task == "gsm8k" else "exact"

        def save() -> None:
            ckpt.save(trainer.state.step, trainer.model_optim_state(),
                      {**trainer.train_state(), "rollout": source.state_dict()}, cfg.to_yaml(), tok, tok.name,
                      meta={"tokens_seen": trainer.state.tokens_seen, "strategy": pm.strategy, "stage": "grpo"})

        def evaluate() -> dict[str, float]:
            acc, replies = exact_match(pm.model, tok, items, mode, r.max_new_tokens, r.eval_batch_size, end_id,
                                       lockstep=pm.sharded)
            if replies:
                D.print0(f"  e.g. {task.item(0, 'eval').prompt[:60]!r} -> {replies[0][:80]!r}")
            return {"val/accuracy": acc}

        if resumed is None and items:  # the starting point, for before/after comparisons
            logger.log(0, evaluate(), prefix="eval  ")
        return run_fit(trainer, source, ckpt, logger, "grpo", out_dir, save, throughput=throughput,
                       evaluate=evaluate if items else None, seq_len=seq_len)

