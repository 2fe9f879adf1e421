"""DPO stage: a policy from an SFT/pretrain checkpoint trained on preference pairs against its frozen self.

`main(cfg)` follows the reward stage's wiring: runtime -> chat tokenizer -> pairs (the rows the reward stage
reads: prompt/chosen/rejected, prompt as messages, HH transcripts split at their common prefix) -> policy
(architecture and weights from `dpo.init_from`) -> frozen reference (`llm_dist.align.reference`: sharded
like the policy, or precomputed once and freed; with LoRA the policy itself with its adapters switched off;
none for the reference-free simpo) -> trainer with
`DPOLoss` (summed pair losses over the global number of pairs) -> resume (policy, optimizer, counters, RNG,
the loader's position; the reference is rebuilt from the init weights or its cached log-probs read back)
-> `fit` with held-out metrics at step 0 and every evaluation -> checkpoints.

Logged per step, over all ranks, with TRL's names: loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; per evaluation the same on the held-out
pairs (val/...), plus val/exact_match (greedy replies to held-out prompts against the chosen response)
when dpo.eval_examples > 0.
"""

from __future__ import annotations

from pathlib import Path

from llm_dist import distributed as D
from llm_dist.align.dpo_loss import REFERENCE_FREE, DPOLoss
from llm_dist.align.reference import build_reference, precompute_reference
from llm_dist.config import Config, ConfigError
from llm_dist.model.lora import AdaptersOff
from llm_dist.model.transformer import model_summary
from llm_dist.parallel import build_parallel_model
from llm_dist.reward.data import Pair, PairLoader, read_pairs, tokenize_pairs
from llm_dist.sft.chat import DataError
from llm_dist.sft.chat_format import chat_format
from llm_dist.sft.evaluate import exact_match
from llm_dist.stages import (RunResult, checkpoint_saver, open_checkpoints, run_fit, setup_chat_model,
                             stage_runtime, stage_throughput, train_eval_rows, write_run_config)
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.trainer import Trainer, resolve_dtype


def split_pairs(cfg: Config) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): dpo.eval_data if given, else a seeded dpo.eval_fraction of dpo.data."""
    d = cfg.dpo
    return train_eval_rows("dpo", d.data, d.eval_data, d.eval_fraction, cfg.train.seed, read_pairs)


def main(cfg: Config) -> RunResult:
    """Train a policy with DPO (or IPO, hinge, SimPO); returns the run directory, last metrics and exit code
    (0, EXIT_REQUEUE, EXIT_NONFINITE)."""
    try:
        train_pairs, eval_pairs = split_pairs(cfg)
    except DataError as e:
        raise ConfigError(str(e)) from None
    with stage_runtime(cfg) as rt:
        out_dir = Path(cfg.out_dir)
        d, t, fmt = cfg.dpo, cfg.train, chat_format(cfg.chat.template)
        cfg.model.score_head = False  # a policy: the LM head only
        tok, init_url = setup_chat_model(cfg, d.init_from)
        seq_len = cfg.model.block_size
        train_tp, cut = tokenize_pairs(tok, train_pairs, seq_len, 0.0, fmt)
        eval_tp, _ = tokenize_pairs(tok, eval_pairs, seq_len, 0.0, fmt)
        eval_tp = eval_tp[:d.eval_pairs] if d.eval_pairs else eval_tp
        end_id = fmt.end_id(tok)
        loader = PairLoader(train_tp, t.batch_size, t.micro_batch_size, rt.rank, rt.world_size, seed=t.seed,
                            pad_id=end_id, device=rt.device, targets=True)
        D.print0(f"dpo data: {len(train_tp)} train / {len(eval_tp)} held-out pairs ({cut} cut to their last "
                 f"{seq_len} tokens), chat format {fmt.name}; {loader}")

        amp_dtype = resolve_dtype(t.dtype, rt.device)
        pm = build_parallel_model(cfg, rt, amp_dtype)
        D.print0(f"{rt.world_size} rank(s) on {rt.device}, strategy {pm.strategy}; {model_summary(pm.model)}")
        loss = DPOLoss(d.loss, d.beta, d.label_smoothing, d.simpo_gamma, rpo_alpha=d.rpo_alpha)
        trainer = Trainer(cfg, rt, pm, loss_fn=loss, amp_dtype=amp_dtype)
        ckpt, resumed = open_checkpoints(cfg, trainer, out_dir, lambda ts: loader.load_state_dict(ts["loader"]),
                                         init_url, tokenizer=tok)
        if d.loss in REFERENCE_FREE:
            how = "none (reference-free loss)"
        elif d.precompute_ref:
            how = "log-probs " + precompute_reference(cfg, rt, amp_dtype, init_url, out_dir,
                                                      {"train": train_tp, "eval": eval_tp}, end_id, trainer.autocast)
        elif cfg.model.lora.rank > 0:  # the frozen base is the reference: the policy with its adapters off
            loss.reference = AdaptersOff(pm.model)
            how = f"the policy with its LoRA adapters switched off ({init_url}; no second copy)"
        else:
            loss.reference = build_reference(cfg, rt, amp_dtype, init_url)
            how = f"frozen copy of {init_url or 'the seeded init'}, sharded like the policy"
        D.print0(f"dpo: loss {d.loss}, beta {d.beta}"
                 f"{f', label smoothing {d.label_smoothing}' if d.label_smoothing else ''}"
                 f"{f', gamma {d.simpo_gamma}' if d.loss == 'simpo' else ''}"
                 f"{f', + {d.rpo_alpha} x chosen NLL (RPO)' if d.rpo_alpha else ''}; reference: {how}")
        write_run_config(cfg, out_dir)
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        throughput = stage_throughput(cfg, rt, pm.model, amp_dtype, seq_len)
        eval_batches = loader.eval_batches(eval_tp) if eval_tp else []
        items = [(fmt.prompt_ids(tok, p.prompt), p.chosen) for p in eval_pairs[:d.eval_examples]]

        save = checkpoint_saver(ckpt, trainer, cfg, tok, tok.name, pm.strategy,
                                lambda: {"loader": loader.state_dict()}, stage="dpo")

        def evaluate() -> dict[str, float]:
            loss.reset_stats()
            out = {"val/loss": trainer.evaluate(eval_batches)}  # mean pair loss over all ranks
            out.update({f"val/{k}": v for k, v in loss.step_stats(rt.device).items()})
            if items:
                out["val/exact_match"], _ = exact_match(pm.model, tok, items, d.answer, d.max_new_tokens,
                                                        d.eval_batch_size, end_id, lockstep=pm.sharded)
            return out

        has_eval = bool(eval_batches)
        if resumed is None and has_eval:  # the starting point, for before/after comparisons
            logger.log(0, evaluate(), prefix="eval  ")
        return run_fit(trainer, loader, ckpt, logger, "dpo", out_dir, save, throughput=throughput,
                       evaluate=evaluate if has_eval else None, seq_len=seq_len)
