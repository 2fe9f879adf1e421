"""Supervised fine-tuning stage: chat-formatted examples, loss on response tokens, packed rows.

`main(cfg)` follows the pretraining stage's wiring: runtime -> tokenizer (+ chat tokens) -> examples ->
model (architecture and weights from `sft.init_from`, vocabulary grown for the chat tokens) -> trainer
(with `packed_lm_loss`) -> resume (model, optimizer, counters, RNG and the loader's exact position) ->
`fit` with held-out loss and greedy exact-match evaluation -> checkpoints through the same manager.
"""

from __future__ import annotations

from pathlib import Path


from llm_dist import distributed as D
from llm_dist.config import Config, ConfigError
from llm_dist.model.transformer import model_summary
from llm_dist.parallel import build_parallel_model
from llm_dist.sft.chat import Conversation, DataError, read_jsonl
from llm_dist.sft.chat_format import chat_format
from llm_dist.sft.data import SFTLoader, eval_prompts, tokenize
from llm_dist.sft.evaluate import exact_match
from llm_dist.sft.packing import enable_packing, packed_lm_loss
from llm_dist.stages import (RunResult, checkpoint_saver, open_checkpoints, run_fit, setup_chat_model,
                             stage_runtime, stage_throughput, train_eval_rows, write_run_config)
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.trainer import Trainer, resolve_dtype


def split_conversations(cfg: Config) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out): sft.eval_data if given, else a seeded sft.eval_fraction of sft.data."""
    s = cfg.sft
    field = s.difficulty_field if s.curriculum == "difficulty" else ""
    return train_eval_rows("sft", s.data, s.eval_data, s.eval_fraction, cfg.train.seed,
                           lambda path: read_jsonl(path, field))


def main(cfg: Config) -> RunResult:
    """Run SFT; returns the run directory, last metrics and exit code (as pretraining: 0, EXIT_REQUEUE,
    EXIT_NONFINITE)."""
    try:
        train_convs, eval_convs = split_conversations(cfg)
    except DataError as e:
        raise ConfigError(str(e)) from None
    with stage_runtime(cfg) as rt:
        out_dir = Path(cfg.out_dir)
        tok, init_url = setup_chat_model(cfg, cfg.sft.init_from, switch_format=True)
        t, s, fmt = cfg.train, cfg.sft, chat_format(cfg.chat.template)
        seq_len = cfg.model.block_size
        train_ex, cut, dropped = tokenize(tok, train_convs, seq_len, fmt)
        eval_ex, _, _ = tokenize(tok, eval_convs, seq_len, fmt)
        end_id = fmt.end_id(tok)
        loader = SFTLoader(train_ex, seq_len, t.batch_size, t.micro_batch_size, rt.rank, rt.world_size,
                           seed=t.seed, pack=s.pack, curriculum=s.curriculum, pad_id=end_id, device=rt.device)
        D.print0(f"sft data: {len(train_ex)} train / {len(eval_ex)} held-out examples ({cut} cut to "
                 f"{seq_len + 1} tokens, {dropped} dropped with no response left), chat format {fmt.name}; {loader}")

        amp_dtype = resolve_dtype(t.dtype, rt.device)
        pm = build_parallel_model(cfg, rt, amp_dtype)
        if s.pack:
            enable_packing(pm.model)
        D.print0(f"{rt.world_size} rank(s) on {rt.device}, strategy {pm.strategy}; {model_summary(pm.model)}")
        trainer = Trainer(cfg, rt, pm, loss_fn=packed_lm_loss, amp_dtype=amp_dtype)
        ckpt, _ = open_checkpoints(cfg, trainer, out_dir, lambda ts: loader.load_state_dict(ts["loader"]), init_url,
                                   tokenizer=tok)
        write_run_config(cfg, out_dir)
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        throughput = stage_throughput(cfg, rt, pm.model, amp_dtype, seq_len)
        items = eval_prompts(tok, eval_convs[: s.eval_examples], fmt)
        eval_batches = loader.eval_batches(eval_ex, max_rows=cfg.eval.steps * t.batch_size) if eval_ex else []

        save = checkpoint_saver(ckpt, trainer, cfg, tok, tok.name, pm.strategy,
                                lambda: {"loader": loader.state_dict()}, stage="sft")

        def evaluate() -> dict[str, float]:
            out: dict[str, float] = {}
            if eval_batches:
                out["val/loss"] = trainer.evaluate(eval_batches)
            if items:
                acc, replies = exact_match(pm.model, tok, items, s.answer, s.max_new_tokens, s.eval_batch_size,
                                           end_id, lockstep=pm.sharded)
                out["val/exact_match"] = acc
                if replies:
                    D.print0(f"  e.g. {eval_convs[0].messages[-2]['content'][:60]!r} -> {replies[0][:80]!r}")
            return out

        return run_fit(trainer, loader, ckpt, logger, "sft", out_dir, save, throughput=throughput,
                       evaluate=evaluate, seq_len=seq_len)
