"""Pretraining stage: next-token prediction on prepared token shards, single process or DDP.

`main(cfg)` wires the pieces together: runtime -> tokenizer -> data (prepared on first use) -> model
(meta device -> materialised -> initialised once) -> trainer -> resume -> training loop -> final sample.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from llm_dist import distributed as D
from llm_dist.checkpoint import CheckpointManager, find_latest, load_checkpoint, set_rng_state
from llm_dist.config import Config, ConfigError
from llm_dist.data.loader import ShardedLoader
from llm_dist.data.prepare import ensure_prepared
from llm_dist.model.generate import generate
from llm_dist.model.transformer import Transformer, build_model, model_summary
from llm_dist.tokenizer import Tokenizer, load_tokenizer
from llm_dist.train.logger import MetricsLogger
from llm_dist.train.loop import fit
from llm_dist.train.throughput import Throughput, peak_flops
from llm_dist.train.trainer import Trainer

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


def resume_path(cfg: Config, ckpt_dir: Path) -> Path | None:
    r = cfg.checkpoint.resume
    if r == "never":
        return None
    if r == "auto":
        return find_latest(ckpt_dir)
    return Path(r)


def check_model_matches(cfg: Config, ckpt_config: dict, path: Path) -> None:
    """Resuming into a different architecture would fail deep inside load_state_dict; say it plainly."""
    saved = ckpt_config.get("model", {})
    mine = dataclasses.asdict(cfg.model)
    diff = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items()
            if k not in ("dropout", "attn_impl", "preset") and saved.get(k) != v]
    if diff:
        raise ConfigError(f"checkpoint {path} has a different model: {'; '.join(diff)}")


def make_sampler(model: Transformer, tok: Tokenizer, cfg: Config, device: torch.device):
    """A closure printing one sample; its own seeded generator leaves the training RNG untouched."""

    def sample() -> str:
        if not D.is_main():
            return ""
        prompt = tok.encode(cfg.eval.sample_prompt) or [tok.eot_id]
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        g = torch.Generator(device=device).manual_seed(cfg.train.seed)
        was_training = model.training
        out = generate(model, idx, cfg.eval.sample_tokens, temperature=cfg.eval.temperature,
                       top_k=cfg.eval.top_k, eos_id=tok.eot_id, generator=g)
        model.train(was_training)
        return tok.decode(out[0].tolist())

    return sample


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

        model = build_model(cfg.model, rt.device, seed=t.seed)  # same init on every rank
        D.print0(f"{rt.world_size} rank(s) on {rt.device} ({rt.backend or 'no process group'}); "
                 f"{model_summary(model)}")
        D.print0(f"data: {loader}")
        trainer = Trainer(cfg, rt, model)
        ckpt = CheckpointManager(out_dir / "checkpoints", cfg.checkpoint.keep_last_k)

        path = resume_path(cfg, ckpt.dir)
        if path is not None:
            ck = load_checkpoint(path, rt.rank, map_location=rt.device)
            check_model_matches(cfg, yaml.safe_load((path / "config.yaml").read_text()), path)
            trainer.load_state_dict(ck["state"])
            loader.load_state_dict(ck["state"]["loader"])
            if ck["rng"] is not None and ck["meta"].get("world_size") == rt.world_size:
                set_rng_state(ck["rng"])
            else:  # another world size: derive each rank's RNG from (seed, step, rank) deterministically
                D.seed_everything(D.rank_seed(t.seed + trainer.state.step, rt.rank))
            D.print0(f"resumed from {path} at step {trainer.state.step} "
                     f"({trainer.state.tokens_seen:,} tokens seen)")
        else:
            D.seed_everything(D.rank_seed(t.seed, rt.rank))  # dropout differs per rank, reproducibly

        if D.is_main():  # the resolved config sits beside the checkpoints and metrics
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(cfg.to_yaml())
        logger = MetricsLogger(out_dir, cfg.logging, cfg.to_dict(), enabled=rt.is_main)
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(trainer.amp_dtype, "fp32")
        throughput = Throughput(model.flops_per_token(seq_len), peak_flops(rt.device, amp), rt.world_size)

        def save() -> None:
            state = {**trainer.state_dict(), "loader": loader.state_dict()}
            ckpt.save(trainer.state.step, state, cfg.to_yaml(), tok, cfg.tokenizer.name,
                      meta={"tokens_seen": trainer.state.tokens_seen})

        def evaluate() -> dict[str, float]:
            loss = trainer.evaluate(list(val.eval_batches(cfg.eval.steps)))
            return {"val/loss": loss, "val/ppl": float(torch.tensor(loss).exp())}

        sample = make_sampler(model, tok, cfg, rt.device)
        try:
            reason = fit(trainer, loader, logger=logger, throughput=throughput, save_checkpoint=save,
                         evaluate=evaluate, sample=sample if cfg.eval.sample_tokens else None, seq_len=seq_len)
        finally:
            logger.close()
        D.print0(f"training {reason} at step {trainer.state.step}; run directory: {out_dir}")
        return 0
