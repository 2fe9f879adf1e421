"""Sampling from a checkpoint: load the model and its tokenizer, generate continuations of a prompt."""

from __future__ import annotations

import sys

import torch

from llm_dist.checkpoint import load_checkpoint_tokenizer, read_config_dict
from llm_dist.checkpoint import resolve_checkpoint as find_checkpoint
from llm_dist.checkpoint.manager import load_checkpoint_weights
from llm_dist.cli import USER_ERRORS, check_device
from llm_dist.cli_args import ArgumentParser, finite_float, nonnegative_int, one_line, positive_int
from llm_dist.config import Config, apply_dict
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
    ap = ArgumentParser(description="Sample text from an llm_dist checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (step_N), or a run dir: newest checkpoint")
    ap.add_argument("--prompt", default="\n", help="text to continue")
    ap.add_argument("--num-samples", type=positive_int, default=1)
    ap.add_argument("--max-new-tokens", type=positive_int, default=300)
    ap.add_argument("--temperature", type=finite_float(0), default=0.8, help="0 = greedy")
    ap.add_argument("--top-k", type=nonnegative_int, default=200, help="0 = no top-k filter")
    ap.add_argument("--top-p", type=finite_float(0, 1, lo_open=True), default=1.0,
                    help="nucleus sampling threshold in (0, 1]; 1 = off")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    ap.add_argument("--seed", type=nonnegative_int, default=1337)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    try:
        check_device(args.device, "--device")
        device = pick_device(args.device, 0)
        model, tok, _ = load_model(args.checkpoint, device)
    except (FileNotFoundError, RuntimeError, *USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
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
