"""Export a run or checkpoint to a Hugging Face folder that `transformers` loads with nothing added.

    from llm_dist.hub.export import export_hf
    export_hf("runs/sft", "out/my-chat-model")        # or: tools/checkpoint.py export-hf runs/sft out/my-chat-model

The folder holds:

    config.json              architecture (GPT-2 / Llama / Mistral, see model/hf_interop.py) + bos/eos/pad ids
    model.safetensors        the weights (fp32 unless `dtype`), vocabulary padding cut off
    generation_config.json   bos, eos (every id generation stops at) and pad ids
    tokenizer.json           a real HF `tokenizers` file encoding exactly as the run's tokenizer
    tokenizer_config.json    PreTrainedTokenizerFast, special tokens, model_max_length (+ chat_template)
    special_tokens_map.json

Special ids: `<|endoftext|>` separates documents in pretraining, so it is bos (what a text follows), eos
and pad (as in GPT-2's own files). A chat model (its tokenizer has the tokens of the run's `chat.template`,
sft/chat_format.py) ends every turn with that format's end-of-turn token (`<|end|>`, `<|im_end|>` or
`<|eot_id|>`): that is the tokenizer's eos token, and generation stops at either it or `<|endoftext|>`
(config and generation_config list both). Its `chat_template` is the format's own Jinja
(`ChatFormat.jinja`), the same definition SFT trained with.

The folder is written next to `out` under a temporary name and moved into place file by file at the end,
so a failed export leaves no half-written folder; an existing non-empty `out` is refused unless `force`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from llm_dist.checkpoint.manager import load_checkpoint_tokenizer, read_config_dict, verify
from llm_dist.checkpoint.tools import CheckpointToolError, resolve
from llm_dist.config import Config, apply_dict
from llm_dist.model.hf_interop import HFFormatError, save_hf
from llm_dist.model.transformer import build_model
from llm_dist.sft.chat_format import ChatFormat, chat_format
from llm_dist.tokenizer import Tokenizer
from llm_dist.tokenizer.hf_export import eot_token, save_hf_tokenizer, special_roles

# Files an export writes (and, with force, replaces); stale weight shards of an earlier export are removed.
_WEIGHT_GLOBS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


class ExportError(ValueError):
    """Bad input for an export (a source, an output folder, a model with no HF equivalent): one line."""


def chat_of(tok: Tokenizer, fmt: ChatFormat) -> ChatFormat | None:
    """`fmt` if `tok` carries its tokens (a model SFT-trained in that chat format), else None."""
    return None if fmt.missing_tokens(tok) else fmt


def special_ids(tok: Tokenizer, chat: ChatFormat | None = None) -> dict:
    """bos_token_id, eos_token_id (an int, or a list with the end-of-turn id first for a chat model) and
    pad_token_id, for config.json and generation_config.json."""
    roles = special_roles(tok, chat.end_token if chat else None)
    ids = tok.special_tokens
    eot = ids[eot_token(tok)]
    eos = [ids[chat.end_token], eot] if chat else eot
    return {"bos_token_id": ids[roles["bos_token"]], "eos_token_id": eos, "pad_token_id": ids[roles["pad_token"]]}


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory (expected a new or empty folder for the export)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: folder is not empty (expected a new or empty folder; pass --force to "
                          "overwrite the exported files in it)")


# Probe texts for the AutoTokenizer check: words, digit runs, contractions, whitespace, non-ASCII.
_PROBES = ("Hello world, it's 2026: 12345 + 678 = 13023.", "1+2=3 and 40+2=42; 7+8=15 or 100 20 3",
           "the quick brown fox jumps over the lazy dog", "  indented\n\ttabs  and   spaces\r\n",
           "naïve café — 東京 🙂", "don't DON'T they'll I'M")


def _auto_tokenizer_problem(folder: Path, tok: Tokenizer) -> str | None:
    """None if `transformers.AutoTokenizer` loads `folder`'s tokenizer with `tok`'s ids on the probe texts,
    else a one-line warning. Needed because transformers 5 forces its own tokenizer class for some model
    types whatever tokenizer_config.json says (qwen2 -> Qwen2Tokenizer, which re-derives Qwen's
    pre-tokenizer), so a Qwen2-style model exported with another tokenizer would be split differently.
    Skipped (None) when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    bad = [t for t in _PROBES if hf(t, add_special_tokens=False)["input_ids"] != tok.encode_ordinary(t)]
    if not bad:
        return None
    return (f"transformers' AutoTokenizer loads this folder as {type(hf).__name__}, which tokenizes {len(bad)} of "
            f"{len(_PROBES)} probe texts differently from the run's tokenizer (e.g. {bad[0]!r}); load it with "
            "PreTrainedTokenizerFast.from_pretrained(folder), which reads tokenizer.json as written")


def resolve_source(path: str) -> str:
    """The checkpoint to export: `path` itself if it is one, else the newest complete one of a run dir,
    refused if incomplete or failing its checksums."""
    url = resolve(path)
    problem = verify(url, checksums=True)
    if problem is not None:
        raise CheckpointToolError(problem)
    return url


def export_hf(source: str, out: str | os.PathLike, dtype: torch.dtype = torch.float32, force: bool = False) -> dict:
    """Write the HF folder for checkpoint/run `source` into `out` (see the module docstring). Returns a summary:
    checkpoint, out, architecture, files, chat, special ids."""
    out = Path(out)
    _check_out(out, force)
    url = resolve_source(source)
    cfg = Config()
    apply_dict(cfg, read_config_dict(url))
    tok = load_checkpoint_tokenizer(url)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ExportError(f"checkpoint {url}: tokenizer has {tok.vocab_size} ids but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    from llm_dist.lora_checkpoint import load_weights
    from llm_dist.model.lora import merge_lora_

    model = build_model(cfg.model, "cpu")
    load_weights(model, url)  # a LoRA checkpoint: its recorded base, then the adapters ...
    merge_lora_(model)  # ... folded into plain linears (nothing to do for a full checkpoint)
    chat = chat_of(tok, chat_format(cfg.chat.template))
    ids = special_ids(tok, chat)

    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            save_hf(model.eval(), tmp, dtype=dtype)
        except HFFormatError as e:
            raise ExportError(f"checkpoint {url}: {e}") from None
        config = json.loads((tmp / "config.json").read_text())
        config.update(ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        try:
            save_hf_tokenizer(tok, tmp, model_max_length=cfg.model.block_size, eos=chat.end_token if chat else None,
                              chat_template=chat.jinja if chat else None)
        except (TypeError, ValueError) as e:  # a tokenizer with no HF equivalent (see tokenizer/hf_export.py)
            raise ExportError(f"checkpoint {url}: tokenizer {tok.name!r} cannot be exported: {e}") from None
        warning = _auto_tokenizer_problem(tmp, tok)
        out.mkdir(parents=True, exist_ok=True)
        for pattern in _WEIGHT_GLOBS:  # an earlier export's shards must not sit beside the new weights
            for stale in out.glob(pattern):
                stale.unlink()
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"checkpoint": url, "out": str(out), "architecture": config["model_type"], "files": files,
            "chat": chat.name if chat else None, "warning": warning, "tokenizer": tok.name, "dtype": config["dtype"], **ids}
