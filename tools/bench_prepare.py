"""Throughput of data preparation from parquet vs. JSONL of the same documents: tokens/s at 1..N processes.

    python tools/bench_prepare.py                                  # 1 GB, GPT-2, 1 and 2 processes
    python tools/bench_prepare.py --size-mb 64 --procs 1 2 4 --out runs/bench_prepare.json

The corpus is synthesized from the bundled real text (Tiny Shakespeare paragraphs and GSM8K problems,
data/ and /work/shared/data when present) into ~3 KB documents (FineWeb-Edu's typical size), each with a
distinct header line, written once as parquet (a `text` column, 10,000-row row groups, snappy) and as
JSONL under --work-dir (a temp dir by default; removed afterwards). Each run is one `prepare_dataset`
call end to end (read, tokenize, write shards) into a fresh output directory; tokens/s counts every token
written. The JSONL run at each process count is the baseline of the parquet run next to it. CPU seconds
(this process + its tokenizer workers, from getrusage) are reported too: on a machine shared with other
jobs, tokens per CPU-second is the figure that does not depend on how much of the CPUs the run was given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from llm_dist.data.prepare import prepare_dataset  # noqa: E402
from llm_dist.tokenizer import load_tokenizer  # noqa: E402

DOC_CHARS = 3000


def base_paragraphs() -> list[str]:
    """Real paragraphs: Tiny Shakespeare's speeches and, when present, GSM8K question + answer pairs."""
    paras = [p for p in (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").split("\n\n")
             if p.strip()]
    for gsm in (ROOT / "data" / "gsm8k" / "train.jsonl", Path("/work/shared/data/gsm8k/train.jsonl")):
        if gsm.is_file():
            for line in gsm.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                paras.append(f"{row['question']}\n{row['answer']}")
            break
    return paras


def write_corpus(work: Path, size_bytes: int) -> tuple[Path, Path, int]:
    """(parquet, jsonl, documents): the same documents in both, about `size_bytes` of UTF-8 text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paras = base_paragraphs()
    pq_path, jl_path = work / "corpus.parquet", work / "corpus.jsonl"
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    written, n_docs, p = 0, 0, 0
    with pq.ParquetWriter(pq_path, schema) as pw, open(jl_path, "w", encoding="utf-8") as jf:
        while written < size_bytes:
            docs = []
            for _ in range(10_000):
                parts, chars = [f"Document {n_docs + len(docs)}."], 0
                while chars < DOC_CHARS:
                    parts.append(paras[p % len(paras)])
                    chars += len(parts[-1])
                    p += 7  # a stride coprime to most lengths: documents differ in their paragraph mix
                docs.append("\n\n".join(parts))
            ids = list(range(n_docs, n_docs + len(docs)))
            pw.write_table(pa.table({"id": ids, "text": docs}, schema=schema))
            for i, d in zip(ids, docs):
                jf.write(json.dumps({"id": i, "text": d}) + "\n")
            written += sum(len(d.encode("utf-8")) for d in docs)
            n_docs += len(docs)
    return pq_path, jl_path, n_docs


def run_one(src: Path, out: Path, tokenizer: str, num_proc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)

    def cpu() -> tuple[float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime  # workers count once joined

    (m0, k0), t0 = cpu(), time.perf_counter()
    index = prepare_dataset(out, str(src), tokenizer, 0.005, num_proc=num_proc, log=None)
    dt = time.perf_counter() - t0
    m1, k1 = cpu()
    shutil.rmtree(out, ignore_errors=True)
    n = index["total_tokens"]
    return {"seconds": dt, "tokens": n, "tokens_per_s": n / dt, "main_cpu_s": m1 - m0, "worker_cpu_s": k1 - k0,
            "tokens_per_cpu_s": n / max(m1 - m0 + k1 - k0, 1e-9)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024, help="text in the synthesized corpus (MB of UTF-8)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--work-dir", default=None, help="where the corpus and outputs go (default: a temp dir)")
    ap.add_argument("--out", default="runs/bench_prepare.json", help="JSON results")
    args = ap.parse_args()

    import pyarrow

    load_tokenizer(args.tokenizer)  # fail early, and keep its first load out of the timings
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        pq_path, jl_path, n_docs = write_corpus(work, int(args.size_mb * 1e6))
        gen_s = time.perf_counter() - t0
        sizes = {"parquet_bytes": pq_path.stat().st_size, "jsonl_bytes": jl_path.stat().st_size}
        print(f"corpus: {n_docs:,} documents, parquet {sizes['parquet_bytes'] / 1e6:,.0f} MB, "
              f"jsonl {sizes['jsonl_bytes'] / 1e6:,.0f} MB ({gen_s:.0f}s to write)", flush=True)
        rows = []
        for p in args.procs:
            for fmt, src in (("jsonl", jl_path), ("parquet", pq_path)):
                r = run_one(src, work / "out", args.tokenizer, p)
                rows.append({"format": fmt, "num_proc": p, **r})
                print(f"  {fmt:8s} num_proc={p}: {r['tokens']:,} tokens in {r['seconds']:.1f}s = "
                      f"{r['tokens_per_s'] / 1e6:.2f}M tokens/s; CPU main {r['main_cpu_s']:.1f}s + workers "
                      f"{r['worker_cpu_s']:.1f}s", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    base = {r["num_proc"]: r["tokens_per_s"] for r in rows if r["format"] == "jsonl"}
    one = {r["format"]: r["tokens_per_s"] for r in rows if r["num_proc"] == args.procs[0]}
    print(f"\n| format | processes | tokens | seconds | M tokens/s | vs JSONL (same procs) | vs {args.procs[0]} proc "
          "| CPU s (main + workers) | M tokens/CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["vs_jsonl"] = r["tokens_per_s"] / base[r["num_proc"]]
        r["vs_first_procs"] = r["tokens_per_s"] / one[r["format"]]
        print(f"| {r['format']} | {r['num_proc']} | {r['tokens']:,} | {r['seconds']:.1f} | "
              f"{r['tokens_per_s'] / 1e6:.2f} | {r['vs_jsonl']:.2f} | {r['vs_first_procs']:.2f} | "
              f"{r['main_cpu_s']:.0f} + {r['worker_cpu_s']:.0f} | {r['tokens_per_cpu_s'] / 1e6:.2f} |")
    result = {
        "benchmark": "bench_prepare", "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "pyarrow": pyarrow.__version__},
        "load_average_after": os.getloadavg(), "tokenizer": args.tokenizer, "documents": n_docs, **sizes, "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
