"""Helpers every training stage shares (pretraining, SFT, RL): paths, vocabulary, resuming, run setup.

Moved out of `llm_dist/pretrain.py` so that the post-training stages reuse the exact same resume logic
(newest verified checkpoint first, fall back to older ones, RNG restored or re-derived) instead of a copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from llm_dist import distributed as D
from llm_dist.bundled import bundled_path
from llm_dist.checkpoint import (CheckpointManager, list_checkpoints, load_checkpoint, load_checkpoint_tokenizer,
                                 read_config_dict, resolve_checkpoint, set_rng_state, verify)
from llm_dist.checkpoint.manager import explain_missing, read_json, tokenizer_record_name, warn_incomplete, without_url
from llm_dist.checkpoint.sharded import CheckpointReadError, UnsafeCheckpointError, one_line
from llm_dist.config import Config, ConfigError, ModelConfig, TokenizerConfig, apply_dict
from llm_dist.distributed import Runtime
from llm_dist.run_lock import RunLock, RunLockError
from llm_dist.model.transformer import Transformer
from llm_dist.tokenizer import Tokenizer, load_tokenizer
from llm_dist.train.throughput import Throughput, peak_flops
from llm_dist.train.trainer import Trainer

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by the scheduler's signal, checkpoint saved, resubmit me
EXIT_NONFINITE = 3

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunResult:
    """What a stage's `main(cfg)` returns: where the run wrote its checkpoints / metrics.jsonl / config.yaml,
    the last value of every metric it logged (`loss`, `val/loss`, `tok_per_s`, ...; empty on ranks other
    than 0 when nothing was logged there) and the process exit status (`cli.run` exits with it)."""

    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    exit_code: int = 0  # 0 finished | EXIT_REQUEUE stopped by a signal, saved | EXIT_NONFINITE halted on NaN/Inf


def resolve_path(p: str) -> str:
    """Relative paths resolve against the current directory, else the repository root of a checkout (its
    data/ files), else the files shipped in the package (`data/tinyshakespeare/...` from an installed wheel)."""
    if "://" in p or Path(p).is_absolute() or Path(p).exists() or any(c in p for c in "*?["):
        return p
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / p).exists():  # a checkout, not site-packages
        return str(REPO_ROOT / p)
    shipped = bundled_path(p)
    return str(shipped) if shipped is not None else p


def build_tokenizer(cfg: Config) -> Tokenizer:
    """tokenizer.name -> Tokenizer ('byte', 'gpt2', or a file/folder resolved like any bundled path)."""
    name = cfg.tokenizer.name
    try:
        return load_tokenizer(resolve_path(name) if name not in ("byte", "gpt2") else name)
    except ValueError as e:  # an unknown name, a missing path, a malformed file: a config problem, one line
        raise ConfigError(f"tokenizer.name: {e}") from None


def run_fit(trainer: Trainer, data, ckpt, logger, stage: str, out_dir: Path,  # noqa: ANN001
            save_checkpoint: Callable[[], None], **fit_kwargs) -> RunResult:
    """Run the training loop (`fit`, extra keyword arguments passed on), then wait for the last checkpoint
    write; returns the run directory, the last logged metrics and the process exit code:

    0 when finished (or stopped by Ctrl-C after saving); EXIT_REQUEUE when a scheduler's SIGTERM/SIGUSR1
    stopped it after saving; EXIT_NONFINITE when it halted on NaN/Inf (the last checkpoint is left as is).
    """
    import signal

    from llm_dist.train.loop import fit
    from llm_dist.train.profiler import StepProfiler
    from llm_dist.train.trainer import NonFiniteError

    try:
        # profile.enabled: a torch.profiler window over the steps, its trace and top-kernels table at the end
        with StepProfiler(trainer.cfg.profile, out_dir, trainer.rt.device) as profiler:
            reason = fit(trainer, data, logger=logger, save_checkpoint=save_checkpoint, poll=ckpt.poll,
                         profiler=profiler, **fit_kwargs)
        ckpt.close()  # the end of training waits for the last background write
    except NonFiniteError as e:
        D.print0(f"error: {e}")
        return RunResult(out_dir, dict(logger.latest), EXIT_NONFINITE)
    finally:
        logger.close()
    D.print0(f"{stage} {reason} at step {trainer.state.step}; run directory: {out_dir}")
    code = EXIT_REQUEUE if reason == "stopped" and trainer.stop.signum not in (None, signal.SIGINT) else 0
    return RunResult(out_dir, dict(logger.latest), code)


def resolve_vocab(cfg: Config, tok: Tokenizer) -> None:
    """model.vocab_size = 0 takes the tokenizer's; a smaller explicit value would drop ids."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than tokenizer "
                          f"{cfg.tokenizer.name!r}'s {tok.vocab_size} ids")


def resume_candidates(cfg: Config, ckpt_dir: str) -> list[str]:
    """Checkpoints to try, newest first: every complete one in `ckpt_dir` (auto), or the one named (a
    checkpoint, a checkpoints dir or a run dir, as `init_from` accepts). Nothing is verified here:
    `resume_run` checks each and says why one is skipped."""
    r = cfg.checkpoint.resume
    if r == "never":
        return []
    if r == "auto":
        complete, incomplete = list_checkpoints(ckpt_dir)
        warn_incomplete(complete, incomplete)
        return list(reversed(complete))
    url = resolve_checkpoint(resolve_path(r))
    if url is None:
        raise CheckpointReadError(f"checkpoint.resume={r}: {explain_missing(resolve_path(r))}")
    return [url]


# Model keys that change how the same parameters are computed, not which parameters exist: free to differ.
_RUNTIME_MODEL_KEYS = ("dropout", "attn_impl", "norm_impl", "preset", "ops")


def check_model_matches(cfg: Config, ckpt_config: dict, path: str) -> None:
    """Resuming into a different architecture would fail deep inside load_state_dict; say it plainly.

    The saved model config is read onto today's defaults, so a key the checkpoint predates counts as its
    default value rather than as a difference.
    """
    saved = ModelConfig()
    apply_dict(saved, ckpt_config.get("model", {}), "model.")
    old, new = dataclasses.asdict(saved), dataclasses.asdict(cfg.model)
    diff = [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items() if k not in _RUNTIME_MODEL_KEYS and old[k] != v]
    if diff:
        raise ConfigError(f"checkpoint {path} has a different model: {'; '.join(diff)}")


def _try_load(cfg: Config, trainer: Trainer, url: str, tokenizer: Tokenizer | None,
              load_extra: Callable[[dict], None] | None) -> dict:
    """Load one checkpoint into `trainer` or raise CheckpointReadError (one line) saying why it is unusable.

    A different architecture or tokenizer is a ConfigError instead: that is the run's config disagreeing
    with a good checkpoint, and falling back to an older one would not help.
    """
    problem = verify(url)  # complete, meta.json readable, every file at its recorded size
    if problem is not None:
        raise CheckpointReadError(problem)
    check_model_matches(cfg, read_config_dict(url), url)
    if tokenizer is not None:
        saved = load_checkpoint_tokenizer(url)
        if saved.fingerprint() != tokenizer.fingerprint():
            raise ConfigError(f"checkpoint {url} was trained with tokenizer {saved.name!r} ({saved.fingerprint()}), "
                              f"this run uses {tokenizer.name!r} ({tokenizer.fingerprint()})")
    ck = load_checkpoint(url, trainer.raw_model, trainer.optimizer, checksums=cfg.checkpoint.checksums,
                         trainable_only=cfg.model.lora.rank > 0)  # LoRA: adapters (+ their optimizer state) only
    try:
        trainer.load_train_state(ck["train_state"])
        if load_extra is not None:
            load_extra(ck["train_state"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CheckpointReadError(f"checkpoint {url}/train_state.json: unusable ({type(e).__name__}: "
                                  f"{one_line(e, 160)})") from None
    return ck


def resume_run(cfg: Config, trainer: Trainer, ckpt_dir: str, rank: int, world: int,
               load_extra: Callable[[dict], None] | None = None, tokenizer: Tokenizer | None = None) -> str | None:
    """Load the newest usable checkpoint into `trainer`, falling back to older ones (each skip said in one
    line). When checkpoints exist but none can be loaded, stop (CheckpointReadError naming each and why):
    starting over would overwrite and prune them, so it takes an explicit `checkpoint.resume=never`.

    `load_extra(train_state)` restores the stage's own resumable state (its data position, ...) from the
    checkpoint's train_state.json; `tokenizer` (the run's) must be the one the checkpoint was trained with.
    Returns the checkpoint URL, or None on a fresh start (RNG seeded per rank).
    """
    candidates = resume_candidates(cfg, ckpt_dir)
    failures: list[tuple[str, str]] = []
    for url in candidates:
        try:
            ck = _try_load(cfg, trainer, url, tokenizer, load_extra)
        except UnsafeCheckpointError:
            raise  # a crafted file is an attack, not damage: stop rather than quietly use an older one
        except CheckpointReadError as e:  # the same verdict on every rank (files are shared, DCP agrees)
            failures.append((url, str(e)))
            continue
        for _, why in failures:  # said only now: when nothing loads, the one error line below says it all
            D.warn0(f"{why}: skipped, resumed from an older checkpoint")
        if ck["rng"] is not None and ck["meta"].get("world_size") == world:
            set_rng_state(ck["rng"])
        else:  # another world size: derive each rank's RNG from (seed, step, rank), deterministically
            D.seed_everything(D.rank_seed(cfg.train.seed + trainer.state.step, rank))
        D.print0(f"resumed from {url} at step {trainer.state.step} ({trainer.state.tokens_seen:,} tokens seen; "
                 f"written by {ck['meta'].get('world_size')} rank(s), now {world})")
        return url
    if failures:
        where = ckpt_dir if cfg.checkpoint.resume == "auto" else cfg.checkpoint.resume
        each = "; ".join(f"{url.rstrip('/').rsplit('/', 1)[-1]}: {without_url(why, url)}" for url, why in failures)
        raise CheckpointReadError(
            f"checkpoint.resume={cfg.checkpoint.resume}: no checkpoint in {where} can be loaded ({each}). "
            "Nothing was changed; fix or move them, or start over with checkpoint.resume=never")
    D.seed_everything(D.rank_seed(cfg.train.seed, rank))  # fresh start: dropout differs per rank, reproducibly
    return None


def open_checkpoints(cfg: Config, trainer: Trainer, out_dir: Path, load_extra: Callable[[dict], None],
                     init_url: str | None = None, tokenizer: Tokenizer | None = None
                     ) -> tuple[CheckpointManager, str | None]:
    """The run's checkpoint manager, after resuming from its newest usable checkpoint (or, on a fresh start,
    loading the weights of `init_url`). Returns (manager, the checkpoint resumed from or None)."""
    lock_run_dir(out_dir)
    ckpt_dir = cfg.checkpoint.dir or str(out_dir / "checkpoints")
    ckpt = CheckpointManager(ckpt_dir, cfg.checkpoint.keep_last_k, async_save=cfg.checkpoint.async_save,
                             checksums=cfg.checkpoint.checksums)
    resumed = resume_run(cfg, trainer, ckpt_dir, D.get_rank(), D.get_world_size(), load_extra, tokenizer)
    if cfg.model.lora.rank:
        # LoRA: the checkpoint held only the adapters; the frozen base comes from the checkpoint it names
        # (checked unchanged), or on a fresh start from init_from, which the run's checkpoints will name.
        from llm_dist.lora_checkpoint import base_reference, check_base, lora_base_of

        ref = lora_base_of(resumed) if resumed is not None else base_reference(init_url)
        if ref is None:
            raise CheckpointReadError(f"checkpoint {resumed}: model.lora is on but its meta.json names no lora_base")
        base = check_base(ref, resumed) if resumed is not None else init_url
        init_from_checkpoint(trainer.raw_model, base, cfg.model.vocab_size, keep_trainable=resumed is not None)
        trainer.lora_base = ref
    elif resumed is None and init_url is not None:
        init_from_checkpoint(trainer.raw_model, init_url, cfg.model.vocab_size)
    trainer.pre_step_hooks.append(ckpt.wait_staged)  # an async save's CPU copy must finish before params change
    return ckpt, resumed


def lock_run_dir(out_dir: Path) -> RunLock:
    """Rank 0 takes the run directory's lock (every rank stops with the same one line when another live run
    holds it)."""
    lock = RunLock(out_dir)
    problem = None
    if D.is_main():
        try:
            note = lock.acquire()
            if note:
                D.warn0(note)
        except RunLockError as e:
            problem = str(e)
    problem = D.agree_on_problem(problem)
    if problem is not None:
        raise RunLockError(problem)
    return lock  # released by cli.run (run_lock.release_all) or at interpreter exit


def stage_runtime(cfg: Config) -> ContextManager[Runtime]:
    """`with stage_runtime(cfg) as rt:` — every stage's process group, built from `cfg.parallel`, with the
    start-up check that all ranks were started with this same resolved config."""
    p = cfg.parallel
    return D.runtime(p.device, p.backend, p.cpu_threads, cfg.to_dict())


def stage_throughput(cfg: Config, rt: Runtime, model: Transformer, amp_dtype: torch.dtype, seq_len: int
                     ) -> Throughput:
    """The tokens/s and MFU meter of a stage: the model's FLOPs per token over the device's peak for the
    training dtype (`logging.peak_tflops` overrides), across all ranks."""
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
    return Throughput(model.flops_per_token(seq_len), peak_flops(rt.device, amp, cfg.logging.peak_tflops),
                      rt.world_size)


def checkpoint_saver(ckpt: CheckpointManager, trainer: Trainer, cfg: Config, tok: Tokenizer, tok_name: str,
                     strategy: str, data_state: Callable[[], dict], stage: str | None = None) -> Callable[[], None]:
    """`save()` for `run_fit`: the model/optimizer shards, the trainer's counters plus `data_state()` (the data
    position: {"loader": ...} or {"rollout": ...}), the resolved config and the tokenizer."""

    def save() -> None:
        meta = {"tokens_seen": trainer.state.tokens_seen, "strategy": strategy, **({"stage": stage} if stage else {}),
                **({"lora_base": trainer.lora_base} if trainer.lora_base else {})}  # LoRA: the frozen base's reference
        ckpt.save(trainer.state.step, trainer.model_optim_state(), {**trainer.train_state(), **data_state()},
                  cfg.to_yaml(), tok, tok_name, meta=meta)

    return save


def write_run_config(cfg: Config, out_dir: Path) -> None:
    """Rank 0 writes the resolved config beside the checkpoints and metrics."""
    if D.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())


def resolve_checkpoint_url(path: str) -> str:
    """A checkpoint dir, or a run / checkpoints dir whose newest complete checkpoint is meant."""
    url = resolve_checkpoint(resolve_path(path))
    if url is None:
        raise ConfigError(f"init_from {path}: {explain_missing(resolve_path(path))}")
    return url


def train_eval_rows(section: str, data: str, eval_data: str, fraction: float, seed: int,
                    read: Callable[[str], list]) -> tuple[list, list]:
    """(train, held-out) rows of a stage's `<section>.data`: `<section>.eval_data` when given, else a seeded
    `<section>.eval_fraction` of the data held out (both in file order). `read(path)` parses one file."""
    if not data:
        raise ConfigError(f"{section}.data: expected a JSONL file, got ''")
    rows = read(resolve_path(data))
    if eval_data:
        return rows, read(resolve_path(eval_data))
    n_eval = int(len(rows) * fraction)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def load_init_source(cfg: Config, init_from: str) -> tuple[Tokenizer, str, ModelConfig]:
    """(tokenizer, URL or folder, model config) of a stage's `init_from`: an llm_dist checkpoint (or run /
    checkpoints dir), or a Hugging Face model folder / hub cache folder (llm_dist.hub.imports).

    The model config is the source's, except dropout and score_head (the stage's choice) and, for an HF
    source, the few keys that do not change the weights (`hub.imports.FREE_MODEL_KEYS`); an HF source with
    other model.* keys set to different values is a ConfigError naming them.
    """
    from llm_dist.hub.imports import HFFormatError, describe, model_for_stage, open_hf, resolve_hf_dir

    path = resolve_path(init_from)
    url = resolve_checkpoint(path)
    if url is not None:
        saved = checkpoint_model_config(url)
        saved.dropout = cfg.model.dropout
        saved.score_head = cfg.model.score_head  # the stage decides (reward model, PPO value), not the checkpoint
        return load_checkpoint_tokenizer(url), url, saved
    if resolve_hf_dir(path) is None:
        raise ConfigError(f"init_from {init_from}: {explain_missing(path)} (nor a Hugging Face model folder "
                          "with config.json, or a hub cache models--org--name folder)")
    try:
        src = open_hf(path, cfg.model.vocab_multiple)
    except HFFormatError as e:
        raise ConfigError(f"init_from {init_from}: {e}") from None
    D.print0(f"init_from: {describe(src)}")
    return src.tokenizer, str(src.folder), model_for_stage(cfg.model, src, f"init_from {init_from}")


def setup_init_model(cfg: Config, init_from: str) -> tuple[Tokenizer, str]:
    """Pretraining's `checkpoint.init_from`: the source's tokenizer and architecture replace the configured ones
    (tokenizer.name records where it came from). Returns (tokenizer, init URL or HF folder)."""
    tok, url, model = load_init_source(cfg, init_from)
    model.vocab_size = max(model.vocab_size, tok.vocab_size)
    cfg.model = model
    # The spec checkpoints record: the HF folder, or the spec the init checkpoint recorded.
    spec = url if _is_hf(url) else str(read_json(url, tokenizer_record_name(url)).get("spec", tok.name))
    if cfg.tokenizer.name not in (TokenizerConfig.name, spec):  # a tokenizer the user asked for, not the source's
        raise ConfigError(f"tokenizer.name={cfg.tokenizer.name!r} conflicts with checkpoint.init_from={init_from}, "
                          f"whose weights belong to its own tokenizer ({spec}); drop tokenizer.name")
    cfg.tokenizer.name = spec
    return tok, url


def setup_chat_model(cfg: Config, init_from: str, *, switch_format: bool = False) -> tuple[Tokenizer, str | None]:
    """The chat tokenizer and the init checkpoint URL (None: random init) of a post-training stage.

    With `init_from` (a checkpoint or run dir, or a Hugging Face model folder: `load_init_source`) the
    tokenizer and the architecture are the source's: cfg.model is replaced, except its dropout (a stage
    chooses its own) and the vocabulary, which grows by the chat format's tokens (`chat.template`) when the
    source's tokenizer lacks them (an HF tokenizer that has them, e.g. Qwen's ChatML tokens, keeps its ids).
    Without it, the configured tokenizer plus those tokens and a randomly initialised model of cfg.model. A
    checkpoint trained in another chat format is refused (its policy would be read in a format it never
    saw), except by SFT (`switch_format`), which may teach it the new one and says so.
    """
    from llm_dist.sft.chat import add_chat_tokens
    from llm_dist.sft.chat_format import chat_format

    if cfg.model.lora.rank and not init_from:
        raise ConfigError(f"model.lora.rank={cfg.model.lora.rank}: LoRA trains adapters on a frozen pretrained "
                          "model; set the stage's init_from (sft/reward/rl.init_from) to its checkpoint")
    fmt = chat_format(cfg.chat.template)
    if not init_from:
        tok = add_chat_tokens(build_tokenizer(cfg), fmt)
        resolve_vocab(cfg, tok)
        return tok, None
    base, url, saved = load_init_source(cfg, init_from)
    if not _is_hf(url):  # an HF model has no llm_dist chat.template record to check
        check_chat_format(url, base, fmt.name, "init_from", switch_ok=switch_format)
    tok = add_chat_tokens(base, fmt)
    saved.vocab_size = max(saved.vocab_size, tok.vocab_size)
    saved.lora = cfg.model.lora  # the stage decides LoRA (the init checkpoint's own adapters, if any, are merged in)
    cfg.model = saved
    return tok, url


def checkpoint_chat_template(url: str) -> str:
    """The `chat.template` a checkpoint's run recorded ("project" for runs from before the key existed:
    that was the only format then)."""
    chat = read_config_dict(url).get("chat")
    return str(chat.get("template", "project")) if isinstance(chat, dict) else "project"


def check_chat_format(url: str, tok: Tokenizer, template: str, key: str, switch_ok: bool = False) -> None:
    """ConfigError when the checkpoint at `url` (tokenizer `tok`) was trained in a chat format other than
    `template`: its run recorded another chat.template and its tokenizer carries that format's tokens (a
    pretraining checkpoint, or an imported one, was never trained in a chat format). With `switch_ok` a
    warning instead."""
    from llm_dist.sft.chat_format import FORMATS

    saved = checkpoint_chat_template(url)
    trained = FORMATS.get(saved)
    if trained is None or saved == template or trained.missing_tokens(tok):
        return
    msg = f"chat.template={template} but {key} {url} was trained with chat.template={saved}"
    if not switch_ok:
        raise ConfigError(f"{msg}; set chat.template={saved}")
    D.warn0(f"{msg}; fine-tuning it into {template}")


def checkpoint_model_config(url: str) -> ModelConfig:
    """The model section of a checkpoint's resolved config."""
    saved = Config()
    apply_dict(saved, read_config_dict(url))
    return saved.model


def resize_vocab_rows(sd: dict[str, torch.Tensor], old_vocab: int, new_vocab: int, new_padded: int) -> None:
    """Grow the token embedding / LM head of a state dict from `old_vocab` to `new_vocab` ids, in place.

    Rows of the new ids (e.g. chat special tokens) are set to the mean of the pretrained ids' rows
    (Hewitt 2021): the new tokens then start as an "average" token, so their logits are neither huge nor
    -inf and the pretrained distribution over old tokens barely moves. Padding rows past new_vocab are 0.
    Rows the checkpoint already had (its own padding included) are kept only for ids < old_vocab.
    """
    for key in ("tok_emb.weight", "lm_head.weight"):
        if key not in sd:
            continue
        w = sd[key]  # (old_padded, C)
        out = torch.zeros(new_padded, w.shape[1], dtype=w.dtype)
        out[:old_vocab] = w[:old_vocab]
        out[old_vocab:new_vocab] = w[:old_vocab].mean(dim=0)
        sd[key] = out


def _is_hf(url: str) -> bool:
    from llm_dist.hub.imports import resolve_hf_dir

    return "://" not in url and resolve_hf_dir(url) is not None


def _hf_weights(model: torch.nn.Module, folder: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(the HF model's config, its weights under llm_dist names) for `init_from_checkpoint`; a bad folder or
    missing tensor is a ConfigError (one line)."""
    from llm_dist.hub.imports import HFFormatError, hf_state_dict, open_hf

    cfg = getattr(model, "cfg", None)
    try:
        src = open_hf(folder, cfg.vocab_multiple if cfg is not None else 64)
        return src.model, hf_state_dict(src, cfg.block_size if cfg is not None else None)
    except HFFormatError as e:
        raise ConfigError(f"init_from {folder}: {e}") from None


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _total(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_from_checkpoint(model: torch.nn.Module, url: str, new_vocab: int, keep_trainable: bool = False,
                         quiet: bool = False) -> None:
    """Initialise a built (maybe sharded) model with a checkpoint's (or an HF folder's) weights, growing its
    vocabulary.

    Every rank reads the full weights into CPU memory (collective under a process group), resizes them,
    and loads them with `set_model_state_dict`, which shards them under FSDP. A LoRA target model keeps its
    adapters (they are not in `url`); a LoRA checkpoint `url` is loaded with its base and merged first.
    `keep_trainable`: leave the parameters that train untouched (resuming a LoRA run: they were just loaded).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from llm_dist.model.transformer import build_model, padded_vocab_size

    from llm_dist.lora_checkpoint import load_weights
    from llm_dist.model.lora import merge_lora_, trainable_names

    old_cfg, sd = _hf_weights(model, url) if _is_hf(url) else (checkpoint_model_config(url), None)
    if sd is None:
        src = build_model(old_cfg, "cpu")
        load_weights(src, url)  # a LoRA checkpoint: its base, then its adapters
        sd = merge_lora_(src).state_dict()  # adapters folded in (nothing to do for a full checkpoint)
    adapters = [k for k in trainable_names(model) if ".lora_" in k]
    if new_vocab != old_cfg.vocab_size:
        resize_vocab_rows(sd, old_cfg.vocab_size, new_vocab, padded_vocab_size(new_vocab, old_cfg.vocab_multiple))
    # The scalar head (reward score / PPO value) may exist on one side only: a new head keeps its fresh
    # init (a policy or reward model started from an LM checkpoint); a head the target lacks is dropped.
    has_head = getattr(model, "score_head", None) is not None
    for k in [k for k in sd if k.startswith("score_head.") and not has_head]:
        del sd[k]
    fresh_head = has_head and "score_head.weight" not in sd
    if keep_trainable:
        for k in trainable_names(model):
            sd.pop(k, None)
    strict = not (fresh_head or adapters or keep_trainable)
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
    if not quiet:
        D.print0(f"initialised from {url} (vocabulary {old_cfg.vocab_size} -> {new_vocab} ids; new rows = mean row"
                 f"{'; scalar head freshly initialised' if fresh_head else ''}"
                 f"{f'; frozen base, LoRA on {len(adapters) // 2} layers: {_trainable(model):,} of {_total(model):,} parameters train' if adapters else ''})")
