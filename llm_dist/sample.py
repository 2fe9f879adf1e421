"""Sampling from a checkpoint: load the model and its tokenizer, generate continuations of a prompt."""

from __future__ import annotations

import argparse
import sys

import torch

from llm_dist.checkpoint import load_checkpoint_tokenizer, read_config_dict
from llm_dist.checkpoint import resolve_checkpoint as find_checkpoint
from llm_dist.checkpoint.manager import load_checkpoint_weights
from llm_dist.config import Config, ConfigError, apply_dict
from llm_dist.distributed import pick_device
from llm_dist.model.generate import generate
from llm_dist.model.transformer import Transformer, build_model
from llm_dist.tokenizer import Tokenizer


def resolve_checkpoint(path: str) -> str:
    """A checkpoint dir, or a run dir / checkpoints dir whose newest complete checkpoint is used."""
    url = find_checkpoint(path)
    if url is None:
        raise FileNotFoundError(f"--checkpoint {path}: no complete checkpoint there (expected a step_N dir or a run dir)")
    return url


def load_model(path: str, device: torch.device | str = "cpu") -> tuple[Transformer, Tokenizer, Config]:
    """Model (eval mode, unsharded) + tokenizer + config from a checkpoint written by any number of ranks."""
    url = resolve_checkpoint(str(path))
    cfg = Config()
    apply_dict(cfg, read_config_dict(url))
    model = build_model(cfg.model, device)
    load_checkpoint_weights(model, url)
    model.eval()
    return model, load_checkpoint_tokenizer(url), cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sample text from an llm_dist checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (step_N), or a run dir: newest checkpoint")
    ap.add_argument("--prompt", default="\n", help="text to continue")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=200, help="0 = no top-k filter")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold; 1 = off")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    if not 0 < args.top_p <= 1 or args.temperature < 0 or args.top_k < 0 or args.num_samples < 1:
        print("error: need 0 < --top-p <= 1, --temperature >= 0, --top-k >= 0, --num-samples >= 1", file=sys.stderr)
        return 2
    device = pick_device(args.device, 0)
    try:
        model, tok, _ = load_model(args.checkpoint, device)
    except (FileNotFoundError, RuntimeError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt) or [tok.eot_id]
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_id=None if args.no_stop else tok.eot_id,
                   use_cache=not args.no_cache, generator=g)
    for i, row in enumerate(out.tolist()):
        new = row[len(ids):]
        if not args.no_stop and tok.eot_id in new:
            new = new[: new.index(tok.eot_id)]
        print(f"---- sample {i} ----\n{args.prompt}{tok.decode(new)}", flush=True)
    return 0
