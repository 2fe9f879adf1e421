"""Pretraining stage: next-token prediction on prepared token shards; single process, DDP, FSDP or HSDP.

`main(cfg)` wires the pieces together: runtime -> tokenizer -> data (prepared on first use) -> model
(meta device -> sharded -> materialised -> initialised once) -> trainer -> resume -> loop -> final sample.

Exit codes: 0 finished (or stopped with Ctrl-C after saving); EXIT_REQUEUE (75) stopped by SIGTERM/SIGUSR1
after saving, so a scheduler script should resubmit; 3 halted on non-finite loss/gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm_dist import distributed as D
from llm_dist.config import Config, ConfigError
from llm_dist.data.loader import ShardedLoader
from llm_dist.data.mixture import read_mixture_file
from llm_dist.data.prepare import prepare_mixture, use_or_prepare
from llm_dist.eval import MCExample, evaluate_lm, evaluate_mc, load_mc, token_byte_lengths
from llm_dist.eval.multiple_choice import MCFormatError
from llm_dist.model.generate import generate
from llm_dist.model.transformer import Transformer, model_summary
from llm_dist.parallel import build_parallel_model
from llm_dist.tokenizer import Tokenizer
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.trainer import Trainer, resolve_dtype
from llm_dist.stages import (EXIT_NONFINITE, EXIT_REQUEUE, RunResult, build_tokenizer, checkpoint_saver,  # noqa: F401
                             open_checkpoints, resolve_path, resolve_vocab, run_fit, setup_init_model,
                             stage_runtime, stage_throughput, write_run_config)


def prepare_data(cfg: Config, tok: Tokenizer) -> str:
    """Rank 0 prepares the shards if data.dir holds no valid prepared data yet; others wait.

    A valid prepared directory is used as is (`use_or_prepare`): data.source is read only to build one.
    """
    data_dir = resolve_path(cfg.data.dir)
    if D.is_main():
        common = dict(text_field=cfg.data.text_field, num_proc=cfg.data.num_proc, log=D.print0,
                      min_split_tokens=cfg.model.block_size + 1,
                      min_tokens_hint=f"use a larger data.source or a smaller model.block_size "
                                      f"(now {cfg.model.block_size})")
        if cfg.data.mixture:  # each source to its own sub-directory; mixture.json holds the weights
            prepare_mixture(data_dir, read_mixture_file(resolve_path(cfg.data.mixture)), tok, cfg.data.val_fraction,
                            use_existing=True, **common)
        else:
            use_or_prepare(data_dir, resolve_path(cfg.data.source), tok, cfg.data.val_fraction, **common)
    D.barrier()
    return data_dir


def load_mc_examples(cfg: Config) -> list[MCExample] | None:
    """The multiple-choice set of `eval.mc_data` (None when unset); a malformed file is a config error."""
    if not cfg.eval.mc_data:
        return None
    try:
        return load_mc(resolve_path(cfg.eval.mc_data), cfg.eval.mc_examples)
    except MCFormatError as e:
        raise ConfigError(f"eval.mc_data: {e}") from None


def make_sampler(model: Transformer, tok: Tokenizer, cfg: Config, device: torch.device):
    """A closure returning one sample; its own seeded generator leaves the training RNG untouched.

    Every rank runs it (under FSDP each forward needs all ranks' shards; identical inputs and seeds give
    every rank the same tokens, so they stop together); rank 0 prints it.
    """

    def sample() -> str:
        prompt = tok.encode(cfg.eval.sample_prompt) or [tok.eot_id]
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        g = torch.Generator(device=device).manual_seed(cfg.train.seed)
        out = generate(model, idx, cfg.eval.sample_tokens, temperature=cfg.eval.temperature,
                       top_k=cfg.eval.top_k, eos_id=tok.eot_id, generator=g)
        return tok.decode(out[0].tolist())

    return sample


def main(cfg: Config) -> RunResult:
    """Run pretraining; returns the run directory, the last logged metrics and the process exit code."""
    if cfg.model.lora.rank:
        raise ConfigError(f"model.lora.rank={cfg.model.lora.rank}: LoRA is for fine-tuning stages (sft, reward, ppo, "
                          "grpo) that start from a pretrained init_from checkpoint; pretraining trains every weight")
    with stage_runtime(cfg) as rt:
        out_dir = Path(cfg.out_dir)
        init_url = None
        if cfg.checkpoint.init_from:  # the source's tokenizer and architecture (HF folder or checkpoint)
            tok, init_url = setup_init_model(cfg, cfg.checkpoint.init_from)
        else:
            tok = build_tokenizer(cfg)
            resolve_vocab(cfg, tok)
        mc_examples = load_mc_examples(cfg)  # a bad file fails here, before any model is built
        data_dir = prepare_data(cfg, tok)
        t = cfg.train
        seq_len = cfg.model.block_size
        loader = ShardedLoader(data_dir, "train", seq_len, t.batch_size, t.micro_batch_size, rt.rank,
                               rt.world_size, seed=t.seed, shuffle=cfg.data.shuffle, device=rt.device)
        if loader.tokenizer_info.get("fingerprint") not in (None, tok.fingerprint()):
            raise ConfigError(f"data.dir {data_dir} was prepared with another tokenizer "
                              f"({loader.tokenizer_info.get('name')}, not {cfg.tokenizer.name}); set tokenizer.name "
                              "to it, point data.dir elsewhere, or rebuild it with tools/prepare_data.py --overwrite")
        val = ShardedLoader(data_dir, "val", seq_len, t.batch_size, t.micro_batch_size, rt.rank, rt.world_size,
                            shuffle=False, device=rt.device)

        amp_dtype = resolve_dtype(t.dtype, rt.device)
        pm = build_parallel_model(cfg, rt, amp_dtype)  # same init on every rank, for every strategy
        D.print0(f"{rt.world_size} rank(s) on {rt.device} ({rt.backend or 'no process group'}), strategy "
                 f"{pm.strategy}, activation checkpointing {cfg.parallel.ac}; {model_summary(pm.model)}")
        D.print0(f"data: {loader}")
        trainer = Trainer(cfg, rt, pm, amp_dtype=amp_dtype)
        ckpt, _ = open_checkpoints(cfg, trainer, out_dir, lambda ts: loader.load_state_dict(ts["loader"]),
                                   init_url, tokenizer=tok)

        write_run_config(cfg, out_dir)
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        throughput = stage_throughput(cfg, rt, pm.model, amp_dtype, seq_len)
        save = checkpoint_saver(ckpt, trainer, cfg, tok, cfg.tokenizer.name, pm.strategy,
                                lambda: {"loader": loader.state_dict()})

        byte_lengths = token_byte_lengths(tok, pm.model.padded_vocab_size)

        def evaluate() -> dict[str, float]:
            # The bare (maybe sharded) model: a forward needs no DDP hooks; under FSDP every rank joins in.
            out = evaluate_lm(trainer.raw_model, val.eval_batches(cfg.eval.steps), byte_lengths,
                              trainer.autocast()).metrics("val")
            if mc_examples is not None:
                out.update(evaluate_mc(trainer.raw_model, tok, mc_examples, seq_len, cfg.eval.mc_batch_size,
                                       trainer.autocast()))
            return out

        sample = make_sampler(pm.model, tok, cfg, rt.device)
        return run_fit(trainer, loader, ckpt, logger, "training", out_dir, save, throughput=throughput,
                       evaluate=evaluate, sample=sample if cfg.eval.sample_tokens else None, seq_len=seq_len)
