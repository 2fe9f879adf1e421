"""Checkpoints of LoRA runs: the adapters plus a reference to the frozen base, and merging them for export.

A LoRA run (`model.lora.rank` > 0) saves only the parameters that train (the adapters, a fresh score head)
and their optimizer state, in the usual checkpoint layout (`llm_dist/checkpoint/manager.py`); its meta.json
adds

    "lora_base": {"url": <the init_from checkpoint>, "fingerprint": <sha256 of that checkpoint's meta.json>}

meta.json lists every file of a checkpoint with its size and checksums, plus the time it was written, so its
digest names one exact write of the base (a Hugging Face folder base: its config.json and weight file
sizes): a base that was deleted, overwritten or re-saved is refused (one line, exit 2) rather than silently
combined with adapters trained on other weights. Loading a LoRA
checkpoint (resume, sample, reward model, init_from) loads the base the way `init_from` did (vocabulary
grown for the chat tokens), then the adapters. A base may itself be a LoRA checkpoint: it is loaded
(recursively) and merged first.

`merge_lora_checkpoint` writes one safetensors file of W + (alpha/r) B A with the LoRA section of the config
switched off: an ordinary model for `tools/checkpoint.py`, `build_from_safetensors` and HF export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import fsspec
import torch

from llm_dist.checkpoint import read_config_dict, verify
from llm_dist.checkpoint.manager import load_checkpoint_weights, read_json, tokenizer_record_name
from llm_dist.checkpoint.sharded import CheckpointReadError
from llm_dist.config import Config, LoRAConfig, apply_dict


def _hf_folder(url: str) -> str | None:
    """The folder of a Hugging Face model base (`init_from=<HF folder>`), else None."""
    from llm_dist.hub.imports import resolve_hf_dir

    folder = resolve_hf_dir(url) if "://" not in url else None
    return str(folder) if folder is not None else None


def fingerprint(url: str) -> str:
    """sha256 (16 hex digits) of a checkpoint's meta.json: its files, sizes, checksums and write time. For a
    Hugging Face folder: of its config.json and the names and sizes of its weight files."""
    folder = _hf_folder(url)
    if folder is not None:
        h = hashlib.sha256(Path(folder, "config.json").read_bytes())
        for name in sorted(os.listdir(folder)):
            if name.endswith((".safetensors", ".bin")):
                h.update(f"{name}:{os.path.getsize(os.path.join(folder, name))}".encode())
        return h.hexdigest()[:16]
    fs, root = fsspec.core.url_to_fs(url)
    try:
        return hashlib.sha256(fs.cat_file(f"{root.rstrip('/')}/meta.json")).hexdigest()[:16]
    except FileNotFoundError:
        raise CheckpointReadError(f"checkpoint {url}: no meta.json") from None


def base_reference(url: str) -> dict:
    """What a LoRA run's checkpoints record about their base checkpoint `url` (a local path made absolute, so
    a resume from another directory finds it)."""
    if "://" not in url:
        url = os.path.abspath(url)
    return {"url": url, "fingerprint": fingerprint(url)}


def lora_base_of(url: str) -> dict | None:
    """The `lora_base` record of checkpoint `url` (None: a full checkpoint)."""
    ref = read_json(url, "meta.json").get("lora_base")
    if ref is not None and not (isinstance(ref, dict) and isinstance(ref.get("url"), str)
                                and isinstance(ref.get("fingerprint"), str)):
        raise CheckpointReadError(f"checkpoint {url}/meta.json: lora_base must be {{url, fingerprint}}, got {ref!r}")
    return ref


def check_base(ref: dict, by: str) -> str:
    """The base checkpoint URL of `ref` (recorded by checkpoint `by`), after checking it is still the same
    complete checkpoint; else a one-line CheckpointReadError naming both."""
    url = ref["url"]
    problem = None if _hf_folder(url) is not None else verify(url)
    if problem is not None:
        raise CheckpointReadError(f"checkpoint {by} holds LoRA adapters of the base {url}, which is unusable "
                                  f"({problem}); restore it there: a LoRA checkpoint stores only the adapters")
    now = fingerprint(url)
    if now != ref["fingerprint"]:
        raise CheckpointReadError(f"checkpoint {by} holds LoRA adapters of the base {url}, which has changed since "
                                  f"(meta.json fingerprint {now}, recorded {ref['fingerprint']}); restore that "
                                  "checkpoint, or start over with checkpoint.resume=never")
    return url


def load_weights(model: torch.nn.Module, url: str) -> None:
    """Full weights of checkpoint `url` into an unsharded model built from its config (`build_model`): a plain
    checkpoint directly; a LoRA one as its base (checked against the recorded fingerprint, vocabulary grown
    as at init_from) followed by its adapters."""
    from llm_dist.stages import init_from_checkpoint

    ref = lora_base_of(url)
    if ref is None:
        load_checkpoint_weights(model, url)
        return
    init_from_checkpoint(model, check_base(ref, url), model.cfg.vocab_size, quiet=True)
    load_checkpoint_weights(model, url, trainable_only=True)


def merged_model(url: str) -> tuple[torch.nn.Module, Config]:
    """(unsharded CPU model with the adapters of LoRA checkpoint `url` folded in, its config with LoRA off)."""
    from llm_dist.model.lora import merge_lora_
    from llm_dist.model.transformer import build_model

    cfg = Config()
    apply_dict(cfg, read_config_dict(url))
    model = build_model(cfg.model, "cpu")
    load_weights(model, url)
    merge_lora_(model)
    cfg.model = dataclasses.replace(cfg.model, lora=LoRAConfig())
    return model, cfg


def merge_lora_checkpoint(path: str, out: str, dtype: torch.dtype | None = None) -> dict:
    """LoRA checkpoint (or run dir) -> one safetensors file of the merged weights + config (LoRA off)."""
    from llm_dist.checkpoint.tools import CheckpointToolError, resolve, save_safetensors

    url = resolve(path)
    problem = verify(url, checksums=True)
    if problem is not None:
        raise CheckpointToolError(problem)
    base = lora_base_of(url)
    if base is None:
        raise CheckpointToolError(f"{url}: not a LoRA checkpoint (its meta.json has no lora_base); "
                                  "export it with tools/checkpoint.py consolidate")
    model, cfg = merged_model(url)
    meta = read_json(url, "meta.json")
    extra = {"source": url, "step": str(meta.get("step", "")), "tokens_seen": str(meta.get("tokens_seen", "")),
             "tokenizer": read_json(url, tokenizer_record_name(url)), "merged_lora": json.dumps(base)}
    summary = save_safetensors(model.state_dict(), out, cfg.to_dict(), extra, dtype)
    return {**summary, "source": url, "base": base["url"]}


def compare_merged(path: str, weights: str, seed: int = 0) -> float:
    """max |logits| difference between LoRA checkpoint `path` (base + adapters, unmerged) and the merged file."""
    from llm_dist.checkpoint.tools import build_from_safetensors, resolve
    from llm_dist.model.transformer import build_model

    url = resolve(path)
    cfg = Config()
    apply_dict(cfg, read_config_dict(url))
    adapted = build_model(cfg.model, "cpu").eval()
    load_weights(adapted, url)
    merged, _ = build_from_safetensors(weights)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.model.vocab_size, (2, min(16, cfg.model.block_size)), generator=g)
    with torch.no_grad():
        return (adapted(x).float() - merged(x).float()).abs().max().item()
