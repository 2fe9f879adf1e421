"""Train a byte-level BPE tokenizer from scratch and save it as one JSON file.

    python tools/train_tokenizer.py data/tinyshakespeare/input.txt --vocab-size 4096 --out tok.json
    python tools/train_tokenizer.py 'corpus/*.txt' --vocab-size 32768 --pattern cl100k --num-proc 8 \
        --special '<|endoftext|>' --special '<|pad|>' --out runs/tok32k.json

Each input file is one document (pre-tokenization never crosses files). Prints progress for
pre-tokenization and merges, then a summary: time, vocabulary, and compression on the input in bytes per
token. Load the result anywhere with `load_tokenizer("runs/tok32k.json")`. Bad input (a flag, an input
pattern matching no file, an --out that cannot be written) prints one line and exits with status 2,
before any training starts.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

from llm_dist.cli_args import ArgumentParser, max_processes, one_line_errors, output_dir_problem, positive_int  # noqa: E402
from llm_dist.tokenizer import EOT, PATTERNS, TokenizerFileError, train_bpe  # noqa: E402
from llm_dist.tokenizer.pretokenize import resolve_pattern  # noqa: E402


class TokenizerInputError(ValueError):
    """Bad input for tokenizer training (a flag, an input pattern, the output path): one line."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files or glob patterns (quoted), UTF-8")
    p.add_argument("--vocab-size", type=positive_int, required=True,
                   help="total ids: 256 bytes + merges + special tokens")
    p.add_argument("--pattern", default="gpt2", help=f"pre-tokenization regex: one of {sorted(PATTERNS)} or a raw regex")
    p.add_argument("--special", action="append", default=None, help=f"special token (repeatable; {EOT} is always added)")
    p.add_argument("--num-proc", type=positive_int, default=None, help="pre-tokenization processes (default: all CPUs)")
    p.add_argument("--name", default=None, help="tokenizer name stored in the file (default: output file stem)")
    p.add_argument("--out", required=True, help="output JSON path")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the (maybe long) training: vocabulary, pattern, specials, --out."""
    if args.num_proc is not None and args.num_proc > max_processes():
        raise TokenizerInputError(f"--num-proc {args.num_proc}: expected at most {max_processes()} (4 x the "
                                  f"{os.cpu_count()} CPUs here)")
    specials = list(dict.fromkeys([EOT, *(args.special or [])]))
    if any(not s for s in specials):
        raise TokenizerInputError("--special: expected a non-empty token string, got ''")
    if args.vocab_size < 256 + len(specials):
        raise TokenizerInputError(f"--vocab-size {args.vocab_size}: expected at least 256 bytes + {len(specials)} "
                                  f"special token(s) = {256 + len(specials)}")
    try:
        resolve_pattern(args.pattern)
    except ValueError as e:
        raise TokenizerInputError(f"--pattern: {e}") from None
    out = Path(args.out)
    if out.is_dir():
        raise TokenizerInputError(f"--out {args.out}: is a directory; expected a JSON file path")
    if not out.parent.is_dir():
        raise TokenizerInputError(f"--out {args.out}: folder {out.parent} does not exist")
    problem = output_dir_problem(out.parent)
    if problem:
        raise TokenizerInputError(f"--out {args.out}: folder {problem}")


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Expand globs; a pattern that matches nothing is an error (a typo should not train on less data)."""
    files: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not hits:
            raise TokenizerInputError(f"input {pat!r} matches no file")
        found = [Path(h) for h in hits if Path(h).is_file()]
        if not found:
            raise TokenizerInputError(f"input {pat!r} matches only directories; expected text files")
        files.extend(found)
    return list(dict.fromkeys(files))


def read_utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the file and offset (not silently replaced)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerInputError(f"{path}: not valid UTF-8 ({e.reason} at byte offset {e.start}); "
                                  "expected UTF-8 text") from None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_args(args)
    files = expand_inputs(args.inputs)
    t0 = time.perf_counter()
    texts = [read_utf8(f) for f in files]
    n_bytes = sum(len(t.encode("utf-8", errors="replace")) for t in texts)
    print(f"read {len(files)} file(s), {n_bytes / 1e6:.2f} MB in {time.perf_counter() - t0:.1f}s", flush=True)

    t1 = time.perf_counter()
    res = train_bpe(texts, args.vocab_size, pattern=args.pattern, special_tokens=args.special or [EOT],
                    num_proc=args.num_proc, progress=not args.quiet)
    train_s = time.perf_counter() - t1
    tok = res.to_tokenizer(args.name or Path(args.out).stem)
    tok.meta = {"trained_on": [str(f) for f in files], "input_bytes": n_bytes, **{k: v for k, v in res.stats.items()}}

    # Compression is measured with the final tokenizer (tiktoken path), i.e. what training will see.
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    tok.meta["bytes_per_token"] = n_bytes / max(n_tokens, 1)
    tok.save(args.out)
    summary = {
        "out": args.out,
        "vocab_size": tok.vocab_size,
        "merges": len(res.merges),
        "special_tokens": tok.special_tokens,
        "unique_words": res.stats["unique_words"],
        "train_s": round(train_s, 3),
        "pretokenize_s": round(res.stats["pretokenize_s"], 3),
        "merge_s": round(res.stats["merge_s"], 3),
        "input_bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
        "fingerprint": tok.fingerprint(),
    }
    print(
        f"trained {summary['vocab_size']:,} ids ({summary['merges']:,} merges, specials {tok.special_tokens}) "
        f"in {train_s:.2f}s (pre-tokenize {summary['pretokenize_s']:.2f}s on {summary['unique_words']:,} unique words, "
        f"merges {summary['merge_s']:.2f}s)\n"
        f"compression on the input: {n_bytes:,} bytes -> {n_tokens:,} tokens = {summary['bytes_per_token']:.3f} bytes/token\n"
        f"saved {args.out} (fingerprint {summary['fingerprint']})",
        flush=True,
    )
    return summary


def cli(argv: list[str] | None = None) -> int:
    """`llm-dist tokenizer ARGS` / `python tools/train_tokenizer.py ARGS`: bad input is one line, exit 2."""
    return one_line_errors(main, (TokenizerInputError, TokenizerFileError), argv)


if __name__ == "__main__":
    sys.exit(cli())
