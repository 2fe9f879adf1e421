"""Inspect, consolidate and convert llm_dist checkpoints (the library is `llm_dist/checkpoint/tools.py`).

    python tools/checkpoint.py inspect runs/default                      # newest complete checkpoint of a run
    python tools/checkpoint.py inspect runs/default/checkpoints/step_00002000 --json
    python tools/checkpoint.py inspect model.safetensors --filter 'blocks.0.*'
    python tools/checkpoint.py consolidate runs/default --out model.safetensors --check
    python tools/checkpoint.py convert runs/default --out model.pt                 # DCP -> torch state dict
    python tools/checkpoint.py convert model.pt --out model.safetensors --config runs/default/config.yaml
    python tools/checkpoint.py convert model.safetensors --out model_bf16.safetensors --dtype bf16
    python tools/checkpoint.py export-hf runs/sft out/hf-model             # a folder transformers loads as is
    python tools/checkpoint.py import-hf ~/models/Qwen2.5-0.5B runs/qwen-base   # HF folder -> init_from-able run
    python tools/checkpoint.py merge-lora runs/sft_lora --out merged.safetensors --check   # fold LoRA adapters in

Checkpoints may be local paths or fsspec URLs; outputs are local files. Bad input prints one line
(`error: <file>: <what was expected>`) and exits with status 2. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from llm_dist.checkpoint.sharded import CheckpointReadError  # noqa: E402
from llm_dist.checkpoint.tools import (DTYPES, CheckpointToolError, compare_logits, consolidate,  # noqa: E402
                                       convert, format_inspect, inspect)
from llm_dist.cli_args import ArgumentParser  # noqa: E402 - one-line argparse errors, exit 2
from llm_dist.config import ConfigError  # noqa: E402
from llm_dist.hub.export import ExportError  # noqa: E402
from llm_dist.model.hf_interop import HFFormatError  # noqa: E402

EXIT_BAD_INPUT = 2


def _dtype(name: str | None):  # noqa: ANN202 - torch.dtype | None
    return DTYPES[name] if name else None


def _report_written(summary: dict) -> None:
    tied = "; tied " + ", ".join(f"{a} = {b}" for a, b in summary["tied"].items()) if summary["tied"] else ""
    print(f"wrote {summary['path']} ({summary['tensors']} tensors, {summary['bytes'] / 1e6:.2f} MB{tied}) "
          f"from {summary['source']}")


def _check(checkpoint: str, weights: str, dtype: str | None) -> int:
    """Exit status 0 when the export reproduces the checkpoint's logits (exactly, up to 1e-6, unless cast)."""
    diff = compare_logits(checkpoint, weights)
    if dtype not in (None, "fp32"):  # a lossy cast was asked for: report the difference, do not fail on it
        print(f"check: max |logits diff| = {diff:.3g} (weights cast to {dtype}, not expected to be exact)")
        return 0
    print(f"check: logits of the exported weights vs the checkpoint, max |diff| = {diff:.3g} "
          f"({'ok' if diff <= 1e-6 else 'MISMATCH'})")
    return 0 if diff <= 1e-6 else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect(args.path)
    print(json.dumps(info, indent=1) if args.json else format_inspect(info, args.filter))
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    summary = consolidate(args.path, args.out, _dtype(args.dtype))
    _report_written(summary)
    return _check(args.path, args.out, args.dtype) if args.check else 0


def cmd_convert(args: argparse.Namespace) -> int:
    summary = convert(args.path, args.out, to=args.to, dtype=_dtype(args.dtype), config=args.config)
    _report_written(summary)
    if args.check:
        if summary["from"] != "dcp" or summary["to"] != "safetensors":
            print("error: --check compares a DCP checkpoint with a safetensors export; "
                  f"this conversion is {summary['from']} -> {summary['to']}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return _check(args.path, args.out, args.dtype)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from llm_dist.hub.export import export_hf

    s = export_hf(args.path, args.out, DTYPES[args.dtype], force=args.force)
    print(f"wrote {s['out']} ({s['architecture']}, {s['dtype']}, tokenizer {s['tokenizer']}"
          f"{', chat template ' + s['chat'] if s['chat'] else ''}; eos ids {s['eos_token_id']}) from {s['checkpoint']}")
    if s["warning"]:
        print(f"warning: {s['warning']}", file=sys.stderr)
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from llm_dist.hub.imports import describe, import_hf, open_hf

    url = import_hf(args.hf_dir, args.out)
    print(f"wrote {url} ({describe(open_hf(args.hf_dir))}); start any stage with *.init_from={args.out}")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from llm_dist.lora_checkpoint import compare_merged, merge_lora_checkpoint

    summary = merge_lora_checkpoint(args.path, args.out, _dtype(args.dtype))
    _report_written(summary)
    if not args.check:
        return 0
    diff = compare_merged(args.path, args.out)
    ok = diff <= 1e-5 or args.dtype not in (None, "fp32")  # a lossy cast was asked for: report only
    print(f"check: logits of the merged weights vs base + adapters, max |diff| = {diff:.3g} ({'ok' if ok else 'MISMATCH'})")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[2:]))
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="step, world size, strategy, config, tensors and sizes of a checkpoint")
    p.add_argument("path", help="checkpoint dir (step_N), run dir / checkpoints dir (newest complete), "
                                "or a .safetensors file")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--filter", default="*", help="only list tensors whose name matches this glob (table only)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("consolidate", help="one unsharded safetensors file of the model weights + config")
    p.add_argument("path", help="checkpoint dir, or run dir / checkpoints dir (newest complete)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: as stored)")
    p.add_argument("--check", action="store_true",
                   help="rebuild the model from the file and compare its logits with the checkpoint's (exit 1 if "
                        "they differ by more than 1e-6)")
    p.set_defaults(fn=cmd_consolidate)

    p = sub.add_parser("convert", help="weights between formats: dcp -> safetensors|pt, safetensors <-> pt")
    p.add_argument("path", help="source: checkpoint/run dir, .safetensors or .pt file")
    p.add_argument("--out", required=True, help="output file (.safetensors or .pt)")
    p.add_argument("--to", choices=["safetensors", "pt", "dcp"], help="output format (default: from --out's extension)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: as stored)")
    p.add_argument("--config", help="run config for a .pt source (checkpoint dir, .safetensors, or config.yaml)")
    p.add_argument("--check", action="store_true", help="dcp -> safetensors only: compare logits as consolidate")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export-hf", help="a Hugging Face folder (weights, config, tokenizer, generation config, "
                                         "chat template) that transformers loads with nothing added")
    p.add_argument("path", help="checkpoint dir, or run dir / checkpoints dir (newest complete)")
    p.add_argument("out", help="output folder (new or empty, unless --force)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default fp32)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing the exported files")
    p.set_defaults(fn=cmd_export_hf)
    p = sub.add_parser("import-hf", help="a Hugging Face folder (or hub cache snapshot) -> an llm_dist run to init_from")
    p.add_argument("hf_dir", help="folder with config.json + *.safetensors + tokenizer.json, or models--org--name")
    p.add_argument("out", help="run directory to write (config.yaml + checkpoints/step_00000000)")
    p.set_defaults(fn=cmd_import_hf)

    p = sub.add_parser("merge-lora", help="LoRA checkpoint -> safetensors of W + (alpha/r) B A (an ordinary model)")
    p.add_argument("path", help="LoRA checkpoint dir, or its run dir / checkpoints dir (newest complete)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: as stored)")
    p.add_argument("--check", action="store_true", help="compare the merged file's logits with base + adapters "
                                                         "(exit 1 if they differ by more than 1e-5)")
    p.set_defaults(fn=cmd_merge_lora)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointToolError, CheckpointReadError, ConfigError, FileNotFoundError, ExportError,
            HFFormatError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
