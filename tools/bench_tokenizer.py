"""Benchmark the tokenizer package against the Rust references, on Tiny Shakespeare, offline.

    python tools/bench_tokenizer.py --out runs/bench_tokenizer.json

(a) BPE training time: our trainer vs HF `tokenizers` (ByteLevel BPE) at the same vocabulary sizes.
    HF is configured to do the same job: GPT-2 regex byte-level pre-tokenizer without prefix space, all
    256 bytes in the initial alphabet, `<|endoftext|>` as the one special, min_frequency=0, so both end
    with exactly vocab_size ids. HF trains with all cores (rayon); ours pre-tokenizes with `--num-proc`.
(b) Encode throughput (MB/s of UTF-8 input): our GPT-2 tokenizer vs a tiktoken Encoding built the way
    tiktoken's `get_encoding("gpt2")` builds it (its r50k pattern, same ranks read from the bundled
    gpt2.tiktoken; no network). Both single-string and batch (`encode_batch` vs `encode_ordinary_batch`).
    The pure-Python reference encoder is timed on a slice for context.

Each timing is the best of `--repeats` runs (the minimum is the least noisy estimate of the cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.tokenizer import EOT, load_gpt2, train_bpe  # noqa: E402
from llm_dist.tokenizer.gpt2 import GPT2_DIR  # noqa: E402
from llm_dist.tokenizer.reference import reference_encode_ordinary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(minimum wall time in seconds, result of the last call)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def hf_train(text: str, vocab_size: int) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok.get_vocab_size()


def bench_training(text: str, vocab_sizes: list[int], repeats: int, num_proc: int) -> list[dict]:
    rows = []
    for v in vocab_sizes:
        ours_s, res = best_of(lambda: train_bpe([text], v, num_proc=num_proc, progress=False), repeats)
        hf_s, hf_vocab = best_of(lambda: hf_train(text, v), repeats)
        ours_vocab = res.to_tokenizer().vocab_size
        rows.append({
            "vocab_size": v, "ours_s": ours_s, "hf_s": hf_s, "ratio_ours_over_hf": ours_s / hf_s,
            "ours_vocab": ours_vocab, "hf_vocab": hf_vocab,
            "ours_pretokenize_s": res.stats["pretokenize_s"], "ours_merge_s": res.stats["merge_s"],
        })
    return rows


def bench_encoding(text: str, repeats: int, ref_chars: int) -> dict:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    ours = load_gpt2()
    ranks = load_tiktoken_bpe(str(GPT2_DIR / "gpt2.tiktoken"))
    ref = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256},
                            explicit_n_vocab=50257)
    mb = len(text.encode("utf-8")) / 1e6
    # Batch: the corpus as ~4 KB documents cut at line ends, like a data-prep job would feed it.
    lines = text.splitlines(keepends=True)
    docs, cur = [], []
    for ln in lines:
        cur.append(ln)
        if sum(map(len, cur)) >= 4096:
            docs.append("".join(cur))
            cur = []
    docs.append("".join(cur))
    threads = ours._threads

    ours.encode_ordinary(text), ref.encode_ordinary(text)  # warm-up (regex compilation, caches)
    s_ours, ids_ours = best_of(lambda: ours.encode_ordinary(text), repeats)
    s_ref, ids_ref = best_of(lambda: ref.encode_ordinary(text), repeats)
    b_ours, bids_ours = best_of(lambda: ours.encode_batch(docs), repeats)
    b_ref, bids_ref = best_of(lambda: ref.encode_ordinary_batch(docs, num_threads=threads), repeats)
    assert ids_ours == ids_ref and bids_ours == bids_ref, "our GPT-2 and tiktoken's disagree"

    sl = text[:ref_chars]
    s_py, _ = best_of(lambda: reference_encode_ordinary(sl, ours.pattern, ours.mergeable_ranks), 1)
    return {
        "input_mb": mb, "tokens": len(ids_ours), "batch_docs": len(docs), "batch_threads": threads,
        "ours_mb_s": mb / s_ours, "tiktoken_mb_s": mb / s_ref, "ratio_ours_over_tiktoken": s_ref / s_ours,
        "ours_batch_mb_s": mb / b_ours, "tiktoken_batch_mb_s": mb / b_ref, "batch_ratio_ours_over_tiktoken": b_ref / b_ours,
        "reference_python_mb_s": len(sl.encode()) / 1e6 / s_py, "reference_chars": len(sl),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=str(REPO / "data" / "tinyshakespeare" / "input.txt"))
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-proc", type=int, default=1, help="our pre-tokenization processes (1 MB: 1 is fastest)")
    p.add_argument("--reference-chars", type=int, default=200_000, help="slice timed with the pure-Python encoder")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    text = Path(args.corpus).read_text(encoding="utf-8")
    import tiktoken
    import tokenizers

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine(),
           "tiktoken": tiktoken.__version__, "tokenizers": tokenizers.__version__, "corpus": args.corpus}
    train = bench_training(text, args.vocab_sizes, args.repeats, args.num_proc)
    enc = bench_encoding(text, args.repeats, args.reference_chars)

    print(f"\nTokenizer benchmark: {Path(args.corpus).name} ({len(text.encode()) / 1e6:.2f} MB), "
          f"{env['cpus']} CPUs, best of {args.repeats}; tiktoken {env['tiktoken']}, tokenizers {env['tokenizers']}\n")
    print("| training (byte-level BPE) | ours (s) | HF tokenizers (s) | ours / HF |")
    print("|---|---:|---:|---:|")
    for r in train:
        print(f"| vocab {r['vocab_size']:,} | {r['ours_s']:.3f} | {r['hf_s']:.3f} | {r['ratio_ours_over_hf']:.2f}x |")
    print("\n| encoding GPT-2 | ours (MB/s) | tiktoken (MB/s) | ours / tiktoken |")
    print("|---|---:|---:|---:|")
    print(f"| single string | {enc['ours_mb_s']:.2f} | {enc['tiktoken_mb_s']:.2f} | {enc['ratio_ours_over_tiktoken']:.2f} |")
    print(f"| batch ({enc['batch_docs']} docs, {enc['batch_threads']} threads) | {enc['ours_batch_mb_s']:.2f} | "
          f"{enc['tiktoken_batch_mb_s']:.2f} | {enc['batch_ratio_ours_over_tiktoken']:.2f} |")
    print(f"| pure-Python reference ({enc['reference_chars']:,} chars) | {enc['reference_python_mb_s']:.2f} | | |")
    result = {"env": env, "training": train, "encoding": enc}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
