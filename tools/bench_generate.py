"""Generation throughput: KV cache vs full recomputation, and the rolling cache far past the context.

    python tools/bench_generate.py                          # debug model, 256 new tokens, batch 1/8/32
    python tools/bench_generate.py --out runs/bench_generate.json --batches 1,8 --new-tokens 128

Model: the `debug` preset shape (2 layers, 4 heads, width 64, byte vocabulary) with its context raised to
`--block-size` so that the prompt plus 256 new tokens fit (otherwise both modes would fall back to the same
sliding recomputation). Random init; greedy decoding, so both modes produce the same tokens (checked).
tokens/s counts new tokens of the whole batch (batch * new_tokens / seconds), best of `--repeats`.

The streaming rows use the same shape with a sliding window (+ sinks) and RoPE: a RollingKVCache of
window + sinks slots generates `--stream-tokens` tokens, many times the context, and the cache's size is
reported to show that it does not grow.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.config import AttnConfig, ModelConfig  # noqa: E402
from llm_dist.model.generate import generate, make_cache  # noqa: E402
from llm_dist.model.presets import get_preset  # noqa: E402
from llm_dist.model.transformer import build_model  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    """Best wall time of `repeats` calls (after one warm-up call) and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark generation with and without the KV cache.")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=512, help="context of the benchmark model")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (best is reported)")
    ap.add_argument("--window", type=int, default=64, help="streaming rows: sliding window")
    ap.add_argument("--sinks", type=int, default=4, help="streaming rows: attention sinks")
    ap.add_argument("--stream-tokens", type=int, default=4096, help="streaming rows: tokens generated (0 = skip)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.prompt_len + args.new_tokens > args.block_size:
        print(f"error: --prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} > --block-size "
              f"{args.block_size}", file=sys.stderr)
        return 2

    shape = dict(get_preset("debug"), block_size=args.block_size, vocab_size=256)
    model = build_model(ModelConfig(**shape), "cpu", seed=0).eval()
    rows = []
    for B in batches:
        prompt = torch.randint(0, 256, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
        res = {}
        for mode, use_cache in (("cache", True), ("recompute", False)):
            secs, out = timed(lambda: generate(model, prompt, args.new_tokens, temperature=0.0, use_cache=use_cache),
                              args.repeats)
            res[mode] = (secs, out)
        same = torch.equal(res["cache"][1], res["recompute"][1])
        for mode in ("cache", "recompute"):
            secs = res[mode][0]
            rows.append({"batch": B, "mode": mode, "new_tokens": args.new_tokens, "seconds": round(secs, 4),
                         "tokens_per_s": round(B * args.new_tokens / secs, 1),
                         "speedup_vs_recompute": round(res["recompute"][0] / secs, 2), "same_tokens": same})

    stream = []
    if args.stream_tokens:
        scfg = ModelConfig(**dict(shape, block_size=args.window * 2, pos_emb="rope"),
                           attn=AttnConfig(window=args.window, sinks=args.sinks))
        smodel = build_model(scfg, "cpu", seed=0).eval()
        for B in batches:
            prompt = torch.randint(0, 256, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
            cache_bytes = make_cache(smodel, B, 0, torch.device("cpu")).nbytes()
            secs, out = timed(lambda: generate(smodel, prompt, args.stream_tokens, temperature=0.0), 1)
            full_bytes = cache_bytes * (args.prompt_len + args.stream_tokens) / (args.window + args.sinks + 1)
            stream.append({"batch": B, "mode": f"rolling (W={args.window}, S={args.sinks})",
                           "new_tokens": args.stream_tokens, "context": scfg.block_size,
                           "seconds": round(secs, 3), "tokens_per_s": round(B * args.stream_tokens / secs, 1),
                           "cache_kib": round(cache_bytes / 1024, 1), "full_cache_kib": round(full_bytes / 1024, 1)})

    print(f"generation benchmark: debug shape (2x64, 4 heads), context {args.block_size}, prompt {args.prompt_len}, "
          f"greedy, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| batch | mode | new tokens | seconds | tokens/s | cache speed-up | same tokens |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['mode']} | {r['new_tokens']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['speedup_vs_recompute']:.1f}x | {r['same_tokens']} |")
    if stream:
        print(f"\nstreaming: {args.stream_tokens} new tokens with context {stream[0]['context']} "
              f"({args.stream_tokens // stream[0]['context']}x the context)")
        print("| batch | mode | new tokens | seconds | tokens/s | cache KiB (constant) | a full cache would need KiB |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in stream:
            print(f"| {r['batch']} | {r['mode']} | {r['new_tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['cache_kib']:,.1f} | {r['full_cache_kib']:,.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                              "threads": torch.get_num_threads(), "rows": rows,
                                              "streaming": stream}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
