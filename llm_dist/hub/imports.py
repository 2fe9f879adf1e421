"""Start from a Hugging Face model: find its folder, read its config, weights and tokenizer, never the network.

    src = open_hf("~/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B")   # or a plain HF folder
    src.model, src.tokenizer                     # llm_dist ModelConfig and Tokenizer
    sd = hf_state_dict(src)                      # llm_dist tensor names and layouts, float32
    import_hf(hf_dir, "runs/qwen-import")        # a project checkpoint any stage can init_from

Accepted paths (`resolve_hf_dir`): a folder with config.json (+ model.safetensors or shards + index
+ tokenizer.json); a hub cache repository folder `models--org--name/` (the snapshot `refs/main` names, or
its only snapshot); a snapshot folder itself. Everything else is an `HFFormatError` (one line naming the
path or key and what was expected). Architectures and fields: `llm_dist.model.hf_interop`.

Stages use it through `init_from=<HF folder>` (see llm_dist/stages.py): the architecture comes from
config.json, a `model.*` key the user set to another value is refused (`check_model_conflicts`), except the
keys that do not change the weights (dropout, attention/norm implementations, block_size at most the HF
context, vocab_multiple).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from llm_dist.config import ConfigError, ModelConfig, flat_dict
from llm_dist.model.hf_interop import (HFFormatError, model_config_from_hf, read_hf_config, read_hf_weights,
                                      state_dict_from_hf)
from llm_dist.model.transformer import padded_vocab_size
from llm_dist.tokenizer import Tokenizer, TokenizerFileError, load_tokenizer

# model.* keys that may differ from the HF config: they change how the weights are used, not which exist.
FREE_MODEL_KEYS = ("preset", "vocab_size", "vocab_multiple", "block_size", "dropout", "attn_impl", "norm_impl",
                   "init_std", "ops", "score_head")


def resolve_hf_dir(path: str | Path) -> Path | None:
    """The folder holding config.json for an HF folder or hub-cache layout at `path`, else None."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if (p / "config.json").is_file():
        return p
    snaps = p / "snapshots"
    if not snaps.is_dir():
        return None
    ref = p / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text().strip()
        if rev and "/" not in rev and (snaps / rev / "config.json").is_file():
            return snaps / rev
    found = sorted(d for d in snaps.iterdir() if (d / "config.json").is_file())
    return found[0] if len(found) == 1 else None


def hf_dir_or_error(path: str | Path) -> Path:
    """`resolve_hf_dir`, or an HFFormatError saying what was found instead."""
    folder = resolve_hf_dir(path)
    if folder is not None:
        return folder
    p = Path(path).expanduser()
    if not p.exists():
        raise HFFormatError(f"{path}: no such directory (expected a Hugging Face model folder)")
    if (p / "snapshots").is_dir():
        raise HFFormatError(f"{path}: hub cache folder without a usable snapshot (refs/main names none with "
                            "config.json, and there is not exactly one)")
    raise HFFormatError(f"{path}: no config.json (expected a Hugging Face model folder or a hub cache "
                        "models--org--name folder)")


@dataclass
class HFSource:
    """A resolved HF model: its folder, raw config.json, the llm_dist model config and the tokenizer."""

    folder: Path
    hf_config: dict
    model: ModelConfig
    tokenizer: Tokenizer


def hf_tokenizer(folder: Path) -> Tokenizer:
    """The folder's tokenizer as `load_tokenizer` reads a folder (tokenizer.json, else vocab.json + merges.txt),
    so data prepared with `--tokenizer <folder>` has the same fingerprint."""
    try:
        return load_tokenizer(folder)
    except TokenizerFileError as e:
        raise HFFormatError(str(e)) from None


def open_hf(path: str | Path, vocab_multiple: int = 64) -> HFSource:
    """Resolve `path`, read config.json and the tokenizer (weights are read later, by `hf_state_dict`)."""
    folder = hf_dir_or_error(path)
    hf = read_hf_config(folder)
    if not isinstance(hf, dict):
        raise HFFormatError(f"{folder}/config.json: expected a JSON object")
    model = model_config_from_hf(hf, vocab_multiple)
    tok = hf_tokenizer(folder)
    if tok.vocab_size > model.vocab_size:
        # Ids past the embedding would index out of range; HF folders normally pad the model's side.
        raise HFFormatError(f"{folder}: the tokenizer has {tok.vocab_size} ids but config.json vocab_size is "
                            f"{model.vocab_size}")
    return HFSource(folder, hf, model, tok)


def hf_state_dict(src: HFSource, block_size: int | None = None) -> dict[str, torch.Tensor]:
    """The HF weights under llm_dist names, float32, vocabulary padded to `src.model`'s; learned positions cut
    to `block_size` when given (a shorter training context). Non-finite weights are refused."""
    cfg = src.model
    padded = padded_vocab_size(cfg.vocab_size, cfg.vocab_multiple)
    try:
        sd = state_dict_from_hf(read_hf_weights(src.folder), src.hf_config, cfg, padded)
    except HFFormatError as e:
        raise HFFormatError(f"{src.folder}: {e}") if str(e).startswith("weights:") else e from None
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    bad = next((k for k, v in sd.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise HFFormatError(f"{src.folder}: weights {bad} hold NaN/Inf values (refusing to train on them)")
    if block_size is not None and "pos_emb.weight" in sd:
        sd["pos_emb.weight"] = sd["pos_emb.weight"][:block_size]
    return sd


def check_model_conflicts(user: ModelConfig, hf: ModelConfig, where: str) -> None:
    """ConfigError naming every model.* key the user set (differs from the default) to a value other than the
    HF model's. FREE_MODEL_KEYS may differ (block_size only downwards)."""
    base = flat_dict(dataclasses.asdict(ModelConfig()))
    mine, theirs = flat_dict(dataclasses.asdict(user)), flat_dict(dataclasses.asdict(hf))
    bad = [f"model.{k}={mine[k]!r} (the model has {theirs[k]!r})" for k in mine
           if k.split(".")[0] not in FREE_MODEL_KEYS and mine[k] != base[k] and mine[k] != theirs[k]]
    if bad:
        raise ConfigError(f"{where}: the architecture comes from the Hugging Face config.json; drop "
                          f"{'; '.join(bad)}")
    if user.block_size != ModelConfig().block_size and user.block_size > hf.block_size:
        raise ConfigError(f"{where}: model.block_size={user.block_size} exceeds the model's context "
                          f"({hf.block_size} positions)")


def model_for_stage(user: ModelConfig, src: HFSource, where: str) -> ModelConfig:
    """The model config a stage trains: the HF architecture plus the user's free keys (dropout, kernels, a
    shorter block_size, vocab_multiple); conflicting keys are a ConfigError."""
    check_model_conflicts(user, src.model, where)
    out = dataclasses.replace(src.model, dropout=user.dropout, attn_impl=user.attn_impl, norm_impl=user.norm_impl,
                              ops=user.ops, score_head=user.score_head, init_std=user.init_std,
                              vocab_multiple=user.vocab_multiple)
    if user.block_size != ModelConfig().block_size:
        # A shorter training context; a Mistral window is kept even when it is longer (attention is then
        # full within block_size, and export still writes the model's window).
        out.block_size = user.block_size
    return out


def import_hf(path: str | Path, out_dir: str | Path, vocab_multiple: int = 64) -> str:
    """Write the HF model at `path` as an llm_dist run: `<out_dir>/config.yaml` and a weights-only checkpoint
    `<out_dir>/checkpoints/step_00000000` (model, resolved config, tokenizer). Returns the checkpoint URL.

    Every stage's init_from (and generate/evaluate/export) reads it; it holds no optimizer state, so it
    starts runs rather than resuming one. Single process.
    """
    from llm_dist.checkpoint import CheckpointManager  # noqa: PLC0415 - checkpoint code only for this tool
    from llm_dist.config import Config
    from llm_dist.model.transformer import build_model

    src = open_hf(path, vocab_multiple)
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise HFFormatError(f"{ckpt_dir}: not empty; refusing to mix an import with existing checkpoints")
    model = build_model(src.model, "cpu")
    model.load_state_dict(hf_state_dict(src))
    cfg = Config()
    cfg.model = src.model
    cfg.tokenizer.name = str(src.folder)
    cfg.out_dir = str(out)
    for section in (cfg.sft, cfg.reward, cfg.rl):
        section.init_from = ""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    mgr = CheckpointManager(str(ckpt_dir), keep_last_k=0)
    url = mgr.save(0, {"model": model.state_dict()}, {"imported_from": str(src.folder)}, cfg.to_yaml(),
                   src.tokenizer, src.tokenizer.name, meta={"stage": "import-hf", "source": str(src.folder)})
    mgr.close()
    return url


def describe(src: HFSource) -> str:
    """One line for logs: architecture, size and tokenizer of an HF source."""
    m = src.model
    extras = [f"rope {m.rope_scaling.type} x{m.rope_scaling.factor}"] if m.rope_scaling.type != "none" else []
    extras += ["qkv bias"] if m.qkv_bias else []
    extras += [f"window {m.attn.window}"] if m.attn.window else []
    return (f"{src.hf_config.get('model_type')} from {src.folder}: {m.n_layer} layers, d {m.n_embd}, heads "
            f"{m.n_head}/{m.n_kv_head or m.n_head}, vocab {m.vocab_size}, context {m.block_size}"
            f"{', ' + ', '.join(extras) if extras else ''}; tokenizer {src.tokenizer.name} "
            f"({src.tokenizer.vocab_size} ids)")


__all__ = ["FREE_MODEL_KEYS", "HFFormatError", "HFSource", "check_model_conflicts", "describe", "hf_dir_or_error",
           "hf_state_dict", "hf_tokenizer", "import_hf", "model_for_stage", "open_hf", "resolve_hf_dir"]

