"""Throughput of ShardedLoader alone (no model): tokens/s for T=1024 batches in one process.

    python tools/bench_loader.py                         # ~200M random uint16 tokens in a temp dir
    python tools/bench_loader.py --data data/prepared/x  # or an existing prepared directory
    python tools/bench_loader.py --out runs/bench_loader.json

The synthetic set is written through the real shard writer (50M-token shards by default), so windows
cross shard boundaries as in real use. Each configuration runs for --seconds of wall time after a warm-up;
tokens/s counts input tokens (micro_batch * seq_len per micro-batch) delivered as int64 tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.data.index import write_token_dataset  # noqa: E402
from llm_dist.data.loader import ShardedLoader  # noqa: E402


def make_synthetic(out: Path, n_tokens: int, shard_tokens: int, vocab: int, seed: int = 0) -> float:
    """Random tokens in 16M-token pieces (bounded memory); returns seconds taken."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    piece = 1 << 24

    def pieces():
        for start in range(0, n_tokens, piece):
            yield rng.integers(0, vocab, size=min(piece, n_tokens - start), dtype=np.uint16)

    write_token_dataset(out, {"train": pieces()}, vocab, vocab - 1, shard_tokens)
    return time.perf_counter() - t0


def bench(data: Path, split: str, seq_len: int, global_batch: int, micro_batch: int, shuffle: bool,
          seconds: float) -> dict:
    ld = ShardedLoader(data, split, seq_len, global_batch, micro_batch, seed=0, shuffle=shuffle)
    for _ in range(3):  # warm-up: permutation, first mappings
        ld.next_batch()
    steps, tokens = 0, 0
    t0 = time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for x, _ in ld.next_batch():
            tokens += x.numel()
        steps += 1
    return {"seq_len": seq_len, "global_batch": global_batch, "micro_batch": micro_batch, "shuffle": shuffle,
            "steps": steps, "seconds": dt, "tokens_per_s": tokens / dt, "ms_per_step": 1e3 * dt / steps,
            "n_tokens": ld.n_tokens, "n_shards": len(ld.stream.files)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="prepared directory to read (default: generate a synthetic one)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--tokens", type=int, default=200_000_000, help="synthetic dataset size")
    ap.add_argument("--shard-tokens", type=int, default=50_000_000)
    ap.add_argument("--vocab", type=int, default=50_257)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batches", default="8,16,32", help="global batch sizes (comma separated)")
    ap.add_argument("--micro-batches", default="8", help="micro-batch sizes; each must divide the batch")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per configuration")
    ap.add_argument("--out", help="write results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the loader is single-threaded; keep the measurement honest

    tmp = None
    if args.data:
        data = Path(args.data)
        gen_s = None
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        data = Path(tmp.name)
        gen_s = make_synthetic(data, args.tokens, args.shard_tokens, args.vocab)
        print(f"wrote {args.tokens:,} random tokens in {args.shard_tokens:,}-token shards to {data} "
              f"in {gen_s:.1f}s")
    try:
        rows = []
        for shuffle in (True, False):
            for b in (int(v) for v in args.batches.split(",")):
                for mb in (int(v) for v in args.micro_batches.split(",")):
                    if b % mb:
                        continue
                    rows.append(bench(data, args.split, args.seq_len, b, mb, shuffle, args.seconds))
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"\n{'order':>8} {'T':>5} {'batch':>5} {'micro':>5} {'steps':>7} {'ms/step':>8} {'M tok/s':>8}")
    for r in rows:
        order = "shuffled" if r["shuffle"] else "in-order"
        print(f"{order:>8} {r['seq_len']:>5} {r['global_batch']:>5} {r['micro_batch']:>5} {r['steps']:>7} "
              f"{r['ms_per_step']:>8.3f} {r['tokens_per_s'] / 1e6:>8.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "data": args.data or f"synthetic {args.tokens} tokens", "generate_seconds": gen_s}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
