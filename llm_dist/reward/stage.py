"""Reward-model stage: a backbone from an SFT/pretrain checkpoint plus a scalar head, trained on preferences.

`main(cfg)` follows the SFT stage's wiring: runtime -> chat tokenizer -> pairs (train / held-out) -> model
(architecture and weights from `reward.init_from`, `model.score_head` on, the head freshly initialised) ->
trainer with `RewardLoss` (the summed pair losses divided by the global number of pairs) -> resume (model,
optimizer, counters, RNG, the loader's position) -> `fit` with held-out pairwise accuracy -> checkpoints.

Logged per step (over all ranks): loss, accuracy (share of pairs ranked right), margin (mean r_c - r_r),
reward_chosen / reward_rejected; per evaluation the same on the held-out pairs (val/...), also at step 0
(before the first update) on a fresh start.
"""

from __future__ import annotations

from pathlib import Path


from llm_dist import distributed as D
from llm_dist.config import Config, ConfigError
from llm_dist.model.transformer import model_summary
from llm_dist.parallel import build_parallel_model
from llm_dist.reward.data import Pair, PairLoader, read_pairs, tokenize_pairs
from llm_dist.reward.loss import RewardLoss
from llm_dist.sft.chat import DataError
from llm_dist.sft.chat_format import chat_format
from llm_dist.stages import (RunResult, checkpoint_saver, open_checkpoints, run_fit, setup_chat_model,
                             stage_runtime, stage_throughput, train_eval_rows, write_run_config)
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.trainer import Trainer, resolve_dtype


def split_pairs(cfg: Config) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): reward.eval_data if given, else a seeded reward.eval_fraction of reward.data."""
    r = cfg.reward
    return train_eval_rows("reward", r.data, r.eval_data, r.eval_fraction, cfg.train.seed, read_pairs)


def main(cfg: Config) -> RunResult:
    """Train a reward model; returns the run directory, last metrics and exit code (0, EXIT_REQUEUE,
    EXIT_NONFINITE)."""
    try:
        train_pairs, eval_pairs = split_pairs(cfg)
    except DataError as e:
        raise ConfigError(str(e)) from None
    with stage_runtime(cfg) as rt:
        out_dir = Path(cfg.out_dir)
        cfg.model.score_head = True
        tok, init_url = setup_chat_model(cfg, cfg.reward.init_from)
        t, r, fmt = cfg.train, cfg.reward, chat_format(cfg.chat.template)
        seq_len = cfg.model.block_size
        train_tp, cut = tokenize_pairs(tok, train_pairs, seq_len, r.margin, fmt)
        eval_tp, _ = tokenize_pairs(tok, eval_pairs, seq_len, r.margin, fmt)
        end_id = fmt.end_id(tok)
        loader = PairLoader(train_tp, t.batch_size, t.micro_batch_size, rt.rank, rt.world_size, seed=t.seed,
                            pad_id=end_id, device=rt.device)
        D.print0(f"reward data: {len(train_tp)} train / {len(eval_tp)} held-out pairs ({cut} cut to their last "
                 f"{seq_len} tokens); {loader}")

        amp_dtype = resolve_dtype(t.dtype, rt.device)
        # An untied LM head takes no part in scoring: frozen, so DDP does not wait for its gradient.
        frozen = () if cfg.model.tie_embeddings else ("lm_head.weight",)
        pm = build_parallel_model(cfg, rt, amp_dtype, frozen=frozen)
        D.print0(f"{rt.world_size} rank(s) on {rt.device}, strategy {pm.strategy}; {model_summary(pm.model)}")
        loss = RewardLoss(r.loss, r.center_coef)
        trainer = Trainer(cfg, rt, pm, loss_fn=loss, amp_dtype=amp_dtype)
        ckpt, resumed = open_checkpoints(cfg, trainer, out_dir, lambda ts: loader.load_state_dict(ts["loader"]),
                                         init_url, tokenizer=tok)
        write_run_config(cfg, out_dir)
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        throughput = stage_throughput(cfg, rt, pm.model, amp_dtype, seq_len)
        eval_batches = loader.eval_batches(eval_tp, max_rows=r.eval_pairs) if eval_tp else []

        save = checkpoint_saver(ckpt, trainer, cfg, tok, tok.name, pm.strategy,
                                lambda: {"loader": loader.state_dict()}, stage="reward")

        def evaluate() -> dict[str, float]:
            loss.reset_stats()
            out = {"val/loss": trainer.evaluate(eval_batches)}  # mean pair loss over all ranks
            out.update({f"val/{k}": v for k, v in loss.step_stats(rt.device).items()})
            return out

        if resumed is None and eval_batches:  # the starting point (a fresh head), for before/after comparisons
            logger.log(0, evaluate(), prefix="eval  ")
        return run_fit(trainer, loader, ckpt, logger, "reward", out_dir, save, throughput=throughput,
                       evaluate=evaluate if eval_batches else None, seq_len=seq_len)
