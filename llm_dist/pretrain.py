"""Pretraining stage: next-token prediction on prepared token shards; single process, DDP, FSDP or HSDP.

`main(cfg)` wires the pieces together: runtime -> tokenizer -> data (prepared on first use) -> model
(meta device -> sharded -> materialised -> initialised once) -> trainer -> resume -> loop -> final sample.

Exit codes: 0 finished (or stopped with Ctrl-C after saving); EXIT_REQUEUE (75) stopped by SIGTERM/SIGUSR1
after saving, so a scheduler script should resubmit; 3 halted on non-finite loss/gradients.
"""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import torch
import yaml

from llm_dist import distributed as D
from llm_dist.checkpoint import (CheckpointManager, find_latest, list_checkpoints, load_checkpoint, read_config,
                                 set_rng_state, verify)
from llm_dist.config import Config, ConfigError
from llm_dist.data.loader import ShardedLoader
from llm_dist.data.prepare import ensure_prepared
from llm_dist.model.generate import generate
from llm_dist.model.transformer import Transformer, model_summary
from llm_dist.parallel import build_parallel_model
from llm_dist.tokenizer import Tokenizer, load_tokenizer
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.loop import fit
from llm_dist.train.throughput import Throughput, peak_flops
from llm_dist.train.trainer import NonFiniteError, Trainer, resolve_dtype

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by the scheduler's signal, checkpoint saved, resubmit me
EXIT_NONFINITE = 3

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(p: str) -> str:
    """Relative paths resolve against the current directory, else the repository root (bundled data)."""
    if "://" in p or Path(p).is_absolute() or Path(p).exists() or any(c in p for c in "*?["):
        return p
    return str(REPO_ROOT / p) if (REPO_ROOT / p).exists() else p


def resolve_vocab(cfg: Config, tok: Tokenizer) -> None:
    """model.vocab_size = 0 takes the tokenizer's; a smaller explicit value would drop ids."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than tokenizer "
                          f"{cfg.tokenizer.name!r}'s {tok.vocab_size} ids")


def prepare_data(cfg: Config, tok: Tokenizer) -> str:
    """Rank 0 prepares the shards if they are not there yet (a no-op when they are); others wait."""
    data_dir = resolve_path(cfg.data.dir)
    if D.is_main():
        ensure_prepared(data_dir, resolve_path(cfg.data.source), tok, cfg.data.val_fraction,
                        text_field=cfg.data.text_field, num_proc=cfg.data.num_proc, log=D.print0)
    D.barrier()
    return data_dir


def resume_candidates(cfg: Config, ckpt_dir: str) -> list[str]:
    """Checkpoints to try, newest first: every complete, verified one (auto), or the one named."""
    r = cfg.checkpoint.resume
    if r == "never":
        return []
    if r == "auto":
        latest = find_latest(ckpt_dir)  # reports incomplete/corrupt ones
        if latest is None:
            return []
        complete, _ = list_checkpoints(ckpt_dir)
        return [u for u in reversed(complete) if u <= latest and verify(u) is None]
    problem = verify(r)
    if problem is not None:
        raise ConfigError(f"checkpoint.resume: {problem}")
    return [r]


def check_model_matches(cfg: Config, ckpt_config: dict, path: str) -> None:
    """Resuming into a different architecture would fail deep inside load_state_dict; say it plainly."""
    saved = ckpt_config.get("model", {})
    mine = dataclasses.asdict(cfg.model)
    diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items()
            if k not in ("dropout", "attn_impl", "preset") and saved.get(k) != v]
    if diff:
        raise ConfigError(f"checkpoint {path} has a different model: {'; '.join(diff)}")


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


def resume(cfg: Config, trainer: Trainer, loader: ShardedLoader, ckpt_dir: str, rank: int, world: int) -> None:
    """Load the newest usable checkpoint (falling back to older ones if one cannot be read)."""
    for url in resume_candidates(cfg, ckpt_dir):
        check_model_matches(cfg, yaml.safe_load(read_config(url)), url)
        try:
            ck = load_checkpoint(url, trainer.raw_model, trainer.optimizer)
        except Exception as e:  # noqa: BLE001 - DCP raises the same error on every rank, so all fall back
            D.warn0(f"checkpoint {url} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
                    "trying an older one")
            continue
        trainer.load_train_state(ck["train_state"])
        loader.load_state_dict(ck["train_state"]["loader"])
        if ck["rng"] is not None and ck["meta"].get("world_size") == world:
            set_rng_state(ck["rng"])
        else:  # another world size: derive each rank's RNG from (seed, step, rank), deterministically
            D.seed_everything(D.rank_seed(cfg.train.seed + trainer.state.step, rank))
        D.print0(f"resumed from {url} at step {trainer.state.step} ({trainer.state.tokens_seen:,} tokens seen; "
                 f"written by {ck['meta'].get('world_size')} rank(s), now {world})")
        return
    D.seed_everything(D.rank_seed(cfg.train.seed, rank))  # fresh start: dropout differs per rank, reproducibly


def main(cfg: Config) -> int:
    """Run pretraining; returns the process exit code."""
    with D.runtime(cfg.parallel.device, cfg.parallel.backend) as rt:
        out_dir = Path(cfg.out_dir)
        tok = load_tokenizer(resolve_path(cfg.tokenizer.name) if cfg.tokenizer.name not in ("byte", "gpt2")
                             else cfg.tokenizer.name)
        resolve_vocab(cfg, tok)
        data_dir = prepare_data(cfg, tok)
        t = cfg.train
        seq_len = cfg.model.block_size
        loader = ShardedLoader(data_dir, "train", seq_len, t.batch_size, t.micro_batch_size, rt.rank,
                               rt.world_size, seed=t.seed, shuffle=cfg.data.shuffle, device=rt.device)
        if loader.tokenizer_info.get("fingerprint") not in (None, tok.fingerprint()):
            raise ConfigError(f"data.dir {data_dir} was prepared with another tokenizer "
                              f"({loader.tokenizer_info.get('name')}); re-prepare it or set tokenizer.name")
        val = ShardedLoader(data_dir, "val", seq_len, t.batch_size, t.micro_batch_size, rt.rank, rt.world_size,
                            shuffle=False, device=rt.device)

        amp_dtype = resolve_dtype(t.dtype, rt.device)
        pm = build_parallel_model(cfg, rt, amp_dtype)  # same init on every rank, for every strategy
        D.print0(f"{rt.world_size} rank(s) on {rt.device} ({rt.backend or 'no process group'}), strategy "
                 f"{pm.strategy}, activation checkpointing {cfg.parallel.ac}; {model_summary(pm.model)}")
        D.print0(f"data: {loader}")
        trainer = Trainer(cfg, rt, pm, amp_dtype=amp_dtype)
        ckpt_dir = cfg.checkpoint.dir or str(out_dir / "checkpoints")
        ckpt = CheckpointManager(ckpt_dir, cfg.checkpoint.keep_last_k, async_save=cfg.checkpoint.async_save)
        resume(cfg, trainer, loader, ckpt_dir, rt.rank, rt.world_size)
        trainer.pre_step_hooks.append(ckpt.wait_staged)  # an async save's CPU copy must finish first

        if D.is_main():  # the resolved config sits beside the checkpoints and metrics
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(cfg.to_yaml())
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
        throughput = Throughput(pm.model.flops_per_token(seq_len), peak_flops(rt.device, amp), rt.world_size)

        def save() -> None:
            ckpt.save(trainer.state.step, trainer.model_optim_state(),
                      {**trainer.train_state(), "loader": loader.state_dict()}, cfg.to_yaml(), tok,
                      cfg.tokenizer.name, meta={"tokens_seen": trainer.state.tokens_seen, "strategy": pm.strategy})

        def evaluate() -> dict[str, float]:
            loss = trainer.evaluate(list(val.eval_batches(cfg.eval.steps)))
            return {"val/loss": loss, "val/ppl": float(torch.tensor(loss).exp())}

        sample = make_sampler(pm.model, tok, cfg, rt.device)
        try:
            reason = fit(trainer, loader, logger=logger, throughput=throughput, save_checkpoint=save, poll=ckpt.poll,
                         evaluate=evaluate, sample=sample if cfg.eval.sample_tokens else None, seq_len=seq_len)
            ckpt.close()  # the end of training waits for the last background write
        except NonFiniteError as e:
            D.print0(f"error: {e}")
            return EXIT_NONFINITE
        finally:
            logger.close()
        D.print0(f"training {reason} at step {trainer.state.step}; run directory: {out_dir}")
        if reason == "stopped" and trainer.stop.signum not in (None, signal.SIGINT):
            return EXIT_REQUEUE
        return 0
