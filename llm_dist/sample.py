"""Sampling from a checkpoint: load the model and its tokenizer, generate continuations of a prompt.

With `--chat` the prompt is a user message (after an optional `--system` one) rendered in the chat format
the checkpoint's run recorded (`chat.template`), followed by the assistant header; generation stops at the
format's end-of-turn token and only the reply is printed."""

from __future__ import annotations

import sys

import torch

from llm_dist.checkpoint import load_checkpoint_tokenizer, read_config_dict
from llm_dist.checkpoint import resolve_checkpoint as find_checkpoint
from llm_dist.cli import USER_ERRORS, check_device
from llm_dist.cli_args import ArgumentParser, finite_float, nonnegative_int, one_line, positive_int
from llm_dist.config import Config, ConfigError, apply_dict
from llm_dist.distributed import pick_device
from llm_dist.lora_checkpoint import load_weights
from llm_dist.model.generate import generate
from llm_dist.model.transformer import Transformer, build_model
from llm_dist.sft.chat_format import chat_format
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
    load_weights(model, url)  # a LoRA checkpoint: its recorded base, then the adapters
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
    ap.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|> (or the end of the turn)")
    ap.add_argument("--chat", action="store_true",
                    help="treat --prompt as a user message in the checkpoint's chat format (chat.template) and "
                         "print the assistant's reply")
    ap.add_argument("--system", default="", help="with --chat: a system message before the prompt")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    ap.add_argument("--seed", type=nonnegative_int, default=1337)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    try:
        check_device(args.device, "--device")
        device = pick_device(args.device, 0)
        model, tok, cfg = load_model(args.checkpoint, device)
        if args.system and not args.chat:
            raise ConfigError("--system needs --chat")
        if args.chat:
            try:
                fmt = chat_format(cfg.chat.template)
            except ValueError as e:
                raise ConfigError(f"--checkpoint {args.checkpoint}: chat.template: {e}") from None
            if fmt.missing_tokens(tok):
                raise ConfigError(f"--checkpoint {args.checkpoint}: its tokenizer has no {fmt.name} chat tokens "
                                 f"({', '.join(fmt.missing_tokens(tok))}): not a model trained in chat.template="
                                 f"{fmt.name}")
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            ids, stop, shown = fmt.prompt_ids(tok, messages), fmt.end_id(tok), ""
        else:
            ids, stop, shown = tok.encode(args.prompt) or [tok.eot_id], tok.eot_id, args.prompt
    except (FileNotFoundError, RuntimeError, *USER_ERRORS) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_id=None if args.no_stop else stop,
                   use_cache=not args.no_cache, generator=g)
    for i, row in enumerate(out.tolist()):
        new = row[len(ids):]
        if not args.no_stop and stop in new:
            new = new[: new.index(stop)]
        print(f"---- sample {i} ----\n{shown}{tok.decode(new)}", flush=True)
    return 0
