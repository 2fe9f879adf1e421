"""Evaluate a checkpoint: loss / perplexity / bits per byte on a prepared split, multiple-choice accuracy.

    python launch/evaluate.py --checkpoint runs/default --mc data/tinyshakespeare/mc_val.jsonl
    python launch/evaluate.py --checkpoint runs/default --data-dir data/prepared/shakespeare_byte --split val
    torchrun --nproc_per_node=2 launch/evaluate.py --checkpoint runs/default --mc hellaswag_val.jsonl

Under torchrun every rank loads the whole model and scores its own share (LM batches split like
training batches; multiple-choice examples strided by rank); the totals are all-reduced, so the
figures equal a single process's. Prints one line per figure and, with --out, writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llm_dist import distributed as D
from llm_dist.cli import USER_ERRORS, check_device, check_output_dir
from llm_dist.cli_args import ArgumentParser, nonnegative_int, one_line, positive_int
from llm_dist.config import ConfigError
from llm_dist.data.loader import ShardedLoader
from llm_dist.eval.lm import evaluate_lm, token_byte_lengths
from llm_dist.eval.multiple_choice import evaluate_mc, load_mc
from llm_dist.stages import resolve_path
from llm_dist.train.trainer import resolve_dtype


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (step_N), or a run dir: its newest checkpoint")
    ap.add_argument("--data-dir", default="", help="prepared data directory; '' = the checkpoint's data.dir")
    ap.add_argument("--split", default="val", help="split of --data-dir to evaluate (val, train, ...)")
    ap.add_argument("--steps", type=nonnegative_int, default=0, help="global batches of the split; 0 = one full pass")
    ap.add_argument("--batch-size", type=positive_int, default=8, help="sequences per rank per forward (LM evaluation)")
    ap.add_argument("--no-lm", action="store_true", help="skip the loss / perplexity / bpb evaluation")
    ap.add_argument("--mc", default="", help="multiple-choice JSONL (HellaSwag or context/endings/label)")
    ap.add_argument("--mc-examples", type=nonnegative_int, default=0, help="first N examples only; 0 = all")
    ap.add_argument("--mc-batch-size", type=positive_int, default=32, help="rows (one per ending) per forward")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="autocast dtype")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto | cpu | cuda")
    ap.add_argument("--out", default="", help="write the figures here as JSON")
    a = ap.parse_args(argv)
    if a.no_lm and not a.mc:
        ap.error("--no-lm without --mc leaves nothing to evaluate")
    return a


def check_out_file(path: str) -> None:
    """--out: a file that can be written (an existing directory, or a parent that cannot hold it, is refused)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--out {path}: is a directory; expected a JSON file path")
    check_output_dir(str(p.parent), f"--out {path}: parent")


def run(a: argparse.Namespace) -> dict[str, float]:
    """The figures (collective under torchrun); rank 0 prints them."""
    import torch

    from llm_dist.sample import load_model

    check_device(a.device, "--device")
    if a.out:
        check_out_file(a.out)
    mc = load_mc(resolve_path(a.mc), a.mc_examples) if a.mc else None  # a bad file fails before the model loads
    with D.runtime(a.device) as rt:
        model, tok, cfg = load_model(a.checkpoint, rt.device)
        amp = resolve_dtype(a.dtype, rt.device)
        autocast = torch.autocast(rt.device.type, dtype=amp) if amp != torch.float32 else None
        T = cfg.model.block_size
        out: dict[str, float] = {}
        if not a.no_lm:
            data_dir = resolve_path(a.data_dir or cfg.data.dir)
            loader = ShardedLoader(data_dir, a.split, T, a.batch_size * rt.world_size, a.batch_size, rt.rank,
                                   rt.world_size, shuffle=False, device=rt.device)
            if loader.tokenizer_info.get("fingerprint") not in (None, tok.fingerprint()):
                raise ConfigError(f"--data-dir {data_dir} was prepared with another tokenizer "
                                  f"({loader.tokenizer_info.get('name')}) than the checkpoint's")
            res = evaluate_lm(model, loader.eval_batches(a.steps or None),
                              token_byte_lengths(tok, model.padded_vocab_size), autocast)
            out.update(res.metrics(a.split))
            out.update({f"{a.split}/tokens": res.tokens, f"{a.split}/bytes": res.bytes})
        if mc is not None:
            out.update(evaluate_mc(model, tok, mc, T, a.mc_batch_size, autocast))
            out["mc/chance"] = sum(1 / len(ex.endings) for ex in mc) / len(mc)
        for k, v in out.items():
            D.print0(f"{k:<14} {v:.4f}" if isinstance(v, float) else f"{k:<14} {v}")
        if a.out and rt.is_main:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"checkpoint": a.checkpoint, **out}, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    try:
        run(a)
    except (*USER_ERRORS, FileNotFoundError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0
