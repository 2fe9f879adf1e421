"""Tokenize text / JSONL / parquet / Arrow corpora into train/val shards + index.json (see docs/data.md).

    python tools/prepare_data.py --input data/tinyshakespeare/input.txt --tokenizer byte \
        --out data/prepared/shakespeare_byte
    python tools/prepare_data.py --input 's3://bucket/corpus/*.jsonl.gz' --text-field content \
        --tokenizer gpt2 --out data/prepared/corpus_gpt2 --num-proc 16 --shard-tokens 100000000
    python tools/prepare_data.py --input 'fineweb-edu/sample/10BT/*.parquet' --tokenizer gpt2 --out data/prepared/fwe
    python tools/prepare_data.py --mixture mix.yaml --tokenizer gpt2 --out data/prepared/mix  # weighted sources

Re-running with the same inputs and tokenizer is a no-op; different inputs into an existing directory are
refused unless --overwrite. Bad input (a flag, a file, a tokenizer, a corpus shorter than one context of
--block-size tokens) prints one line, "error: ..." or "prepare_data.py: error: ...", and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llm_dist.cli import tool_main  # noqa: E402 - any USER_ERRORS: one line, exit 2
from llm_dist.cli_args import ArgumentParser, finite_float, positive_int  # noqa: E402
from llm_dist.data.formats import FORMATS, KINDS  # noqa: E402
from llm_dist.data.mixture import read_mixture_file  # noqa: E402
from llm_dist.data.prepare import DEFAULT_SHARD_TOKENS, prepare_dataset, prepare_mixture  # noqa: E402

DEFAULT_BLOCK_SIZE = 128  # model.block_size's default (llm_dist/config/schema.py)


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", "-i", nargs="+",
                    help=f"files, globs, datasets folders or fsspec URLs; reads {FORMATS} "
                         "(one text file = char split; else per document)")
    ap.add_argument("--mixture", "-m", help="YAML file of {path, weight[, text_field]} sources to prepare for "
                                            "weighted mixing, instead of --input (see docs/data.md)")
    ap.add_argument("--out", "-o", required=True, help="output directory (local)")
    ap.add_argument("--tokenizer", "-t", default="byte", help="'byte', 'gpt2' or a tokenizer file path")
    ap.add_argument("--val-fraction", type=finite_float(0, 1, hi_open=True), default=0.1,
                    help="share of the input held out for validation, in [0, 1)")
    ap.add_argument("--text-field", default="text", help="JSONL key / parquet or Arrow column holding the text")
    ap.add_argument("--format", choices=("auto", *KINDS), default="auto",
                    help="input kind; auto: by magic bytes (parquet, Arrow, gzip/zstd), then name, then a UTF-8 sniff")
    ap.add_argument("--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    ap.add_argument("--num-proc", type=positive_int, default=max(1, min(8, (os.cpu_count() or 1))),
                    help="tokenizer processes")
    ap.add_argument("--block-size", type=positive_int, default=DEFAULT_BLOCK_SIZE,
                    help="context length the data is for: each split must hold at least block_size + 1 tokens "
                         f"(default {DEFAULT_BLOCK_SIZE}, model.block_size's default)")
    ap.add_argument("--overwrite", action="store_true", help="rebuild a directory prepared from other inputs")
    ap.add_argument("--progress-every", type=finite_float(0, lo_open=True), default=5.0,
                    help="seconds between progress lines")
    args = ap.parse_args(argv)
    if (args.input is None) == (args.mixture is None):
        ap.error("pass exactly one of --input and --mixture")

    common = dict(
        text_field=args.text_field, input_format=args.format, shard_tokens=args.shard_tokens,
        num_proc=args.num_proc, overwrite=args.overwrite, progress_interval=args.progress_every,
        log=lambda msg: print(msg, flush=True), min_split_tokens=args.block_size + 1,
        min_tokens_hint=f"use a larger corpus, or a smaller --block-size (now {args.block_size})",
    )
    if args.mixture is not None:
        mix = prepare_mixture(args.out, read_mixture_file(args.mixture), args.tokenizer, args.val_fraction, **common)
        for s in mix["sources"]:
            print(f"{s['dir']}: weight {s['weight']:g} ({s['source']})")
        print(f"mixture of {len(mix['sources'])} sources -> {Path(args.out) / 'mixture.json'}")
        return 0
    index = prepare_dataset(args.out, args.input, args.tokenizer, args.val_fraction, **common)
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['tokens']:,} tokens, {entry['documents']:,} documents, {len(entry['shards'])} shards")
    print(f"{index['dtype']}, vocab {index['vocab_size']:,}, tokenizer {index['tokenizer']['name']} "
          f"({index['tokenizer']['fingerprint']}) -> {Path(args.out) / 'index.json'}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`llm-dist prepare ARGS` / `python tools/prepare_data.py ARGS`: bad input is one line, exit 2."""
    return tool_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
