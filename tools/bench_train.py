"""Training throughput and MFU for a config across strategies, activation checkpointing, compile modes and dtypes.

    python tools/bench_train.py                                         # the default small model, CPU or GPU
    python tools/bench_train.py --config configs/gpt2_124m.yaml --batch 16 --seq 1024 --dtypes bf16 \\
        --compile off,default,reduce-overhead,max-autotune --out runs/bench_train_124m.json
    python tools/bench_train.py --config configs/llama_1b.yaml --batch 4 --seq 2048 --dtypes bf16 \\
        --strategies fsdp --acs selective --compile default --nproc 8
    python tools/bench_train.py ... model.n_layer=6 optim.fused=false  # trailing key=value config overrides

Every configuration (strategy x AC x compile x dtype) runs in a fresh process (ddp/fsdp: --nproc ranks
under `torch.distributed.run`; NCCL on GPUs, gloo on CPU), builds the model exactly as training does
(`build_parallel_model`, `Trainer`: fused AdamW on CUDA, SDPA attention, autocast or FSDP mixed
precision), runs --warmup untimed steps (compilation, autotuning, CUDA graphs, lazy init happen here and
are reported as warm-up time), then --steps timed `Trainer.train_step`s on random tokens (every step ends
in a host sync, so wall time is honest).

Figures per configuration:
  tok/s           global tokens per second over the timed steps (all ranks)
  MFU             `llm_dist.train.throughput.mfu`: tok/s x FLOPs/token / (peak x ranks), the same function and
                  FLOPs/token formula (`Transformer.flops_per_token`, 6N + 12LHQT) as the trainer's log line.
                  Peak: the device's dense datasheet peak for the dtype, looked up from the GPU's name
                  (H100/H200 SXM 989 TFLOP/s bf16, H100 PCIe 756, A100 312; fp32 counts as TF32), or
                  --peak-tflops. None on CPU unless --peak-tflops is given.
  TFLOP/s/dev     achieved model FLOP/s per device (meaningful on CPU too)
  step            median step time of the timed steps
  peak mem        CUDA: max allocated over the timed steps (rank 0); CPU: process RSS after them
  vs first        tok/s relative to the sweep's first configuration, measured by the same command
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

STRATEGIES = ("single", "ddp", "fsdp")
ACS = ("none", "selective", "full")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
DTYPES = ("bf16", "fp32", "fp16")


# ------------------------------------------------------------------------------------------- one config

def config_overrides(a: argparse.Namespace, world_size: int) -> list[str]:
    """The benchmark's settings as config overrides, after the user's own (later ones win)."""
    out = [*a.overrides, f"parallel.strategy={a.strategy}", f"parallel.ac={a.ac}", f"train.dtype={a.dtype}",
           f"train.compile={'false' if a.compile == 'off' else 'true'}",
           f"train.micro_batch_size={a.batch}", f"train.batch_size={a.batch * world_size}",
           "optim.warmup_steps=0", "train.nonfinite=skip", "train.max_skipped_steps=1000000"]
    if a.compile != "off":
        out.append(f"train.compile_mode={a.compile}")
    if a.seq:
        out.append(f"model.block_size={a.seq}")
    return out


def random_batches(vocab: int, batch: int, seq: int, rank: int, device: torch.device
                   ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Endless random (x, y) micro-batches, one per step, different on each rank, made on the device."""
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    while True:
        x = torch.randint(0, vocab, (batch, seq + 1), generator=g, device=device)  # (B, T+1)
        yield [(x[:, :-1], x[:, 1:])]


def measure(a: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process (one rank of it under torchrun): warm-up, then timed steps."""
    from llm_dist.config import load_config
    from llm_dist.distributed import runtime
    from llm_dist.parallel import build_parallel_model
    from llm_dist.stages import build_tokenizer, resolve_vocab
    from llm_dist.train.throughput import Throughput, memory_gib, mfu, peak_flops
    from llm_dist.train.trainer import Trainer, resolve_dtype

    with runtime(a.device) as rt:
        cfg = load_config(a.config or None, config_overrides(a, rt.world_size)).validate(rt.world_size)
        resolve_vocab(cfg, build_tokenizer(cfg))
        cuda = rt.device.type == "cuda"
        amp = resolve_dtype(cfg.train.dtype, rt.device)
        pm = build_parallel_model(cfg, rt, amp)
        trainer = Trainer(cfg, rt, pm, amp_dtype=amp)
        seq = cfg.model.block_size
        data = random_batches(cfg.model.vocab_size, a.batch, seq, rt.rank, rt.device)
        dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32")
        peak = peak_flops(rt.device, dtype_name, a.peak_tflops)
        flops_per_token = pm.model.flops_per_token(seq)

        t0 = time.perf_counter()
        for _ in range(a.warmup):
            trainer.train_step(next(data))
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warmup_s = time.perf_counter() - t0

        tp = Throughput(flops_per_token, peak, rt.world_size)  # the trainer's own meter
        times = []
        tp.resume()
        for _ in range(a.steps):
            s0 = time.perf_counter()
            metrics = trainer.train_step(next(data))  # ends in a host sync (loss, grad norm .tolist())
            tp.step(metrics["tokens"])
            times.append(time.perf_counter() - s0)
        rep = tp.report()
        rec = {
            "strategy": pm.strategy, "ac": cfg.parallel.ac, "compile": a.compile, "dtype": dtype_name,
            "rank": rt.rank, "ranks": rt.world_size, "device": str(rt.device),
            "device_name": torch.cuda.get_device_name(rt.device) if cuda else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "micro_batch": a.batch, "seq": seq,
            "params": pm.model.num_params(), "flops_per_token": flops_per_token,
            "peak_tflops_per_device": peak / 1e12 if peak else None,
            "warmup_s": warmup_s, "step_time_median_s": statistics.median(times), "step_time_mean_s": rep["step_time"],
            "tok_per_s": rep["tok_per_s"], "tok_per_s_per_device": rep["tok_per_s"] / rt.world_size,
            "tflops_per_device": rep["tok_per_s"] * flops_per_token / rt.world_size / 1e12,
            "mfu": mfu(rep["tok_per_s"], flops_per_token, peak * rt.world_size) if peak else None,
            "peak_mem_gib": memory_gib(rt.device), "final_loss": metrics["loss"],
        }
    return rec


# ------------------------------------------------------------------------------------------- launching

def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def launch(a: argparse.Namespace, combo: dict[str, str], tmp: Path) -> dict[str, Any]:
    """Run one configuration in fresh process(es); returns rank 0's record (or the error)."""
    nproc = 1 if combo["strategy"] == "single" else a.nproc
    threads = max(1, a.cores // nproc)  # ranks share the machine's cores, as in real CPU training
    out = tmp / "_".join(combo.values())
    out.mkdir()
    worker = [str(Path(__file__).resolve()), "--worker-dir", str(out), "--threads", str(threads),
              "--strategy", combo["strategy"], "--ac", combo["ac"], "--compile", combo["compile"],
              "--dtype", combo["dtype"], *forwarded_args(a)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker]
    else:
        cmd = [sys.executable, *worker]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True, timeout=a.timeout)
    recs = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    if p.returncode != 0 or not recs:
        tail = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["(no output)"])[-1]
        return {**combo, "ranks": nproc, "error": f"exit {p.returncode}: {tail}", "log": p.stderr[-4000:]}
    r0 = next(r for r in recs if r["rank"] == 0)
    # A step ends when the slowest rank's does; rank 0's Throughput already timed whole synchronised steps.
    r0["step_time_median_s"] = max(r["step_time_median_s"] for r in recs)
    r0["peak_mem_gib_max_rank"] = max(r["peak_mem_gib"] for r in recs)
    return r0


def forwarded_args(a: argparse.Namespace) -> list[str]:
    out = ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--device", a.device, "--peak-tflops", str(a.peak_tflops)]
    if a.config:
        out += ["--config", a.config]
    return out + list(a.overrides)


# ------------------------------------------------------------------------------------------- report

def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| strategy | AC | compile | dtype | tok/s | tok/s/dev | step ms | TFLOP/s/dev | MFU | peak mem GiB "
            "| warm-up s | vs first |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["strategy"] + (f" ×{r['ranks']}" if r.get("ranks", 1) > 1 else "")
        if "error" in r:
            lines.append(f"| {name} | {r['ac']} | {r['compile']} | {r['dtype']} | failed: {r['error'][:80]} "
                         "| | | | | | | |")
            continue
        lines.append(f"| {name} | {r['ac']} | {r['compile']} | {r['dtype']} | {r['tok_per_s']:,.0f} "
                     f"| {r['tok_per_s_per_device']:,.0f} | {1000 * r['step_time_median_s']:.1f} "
                     f"| {r['tflops_per_device']:.3f} | {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
                     f"| {r['peak_mem_gib']:.2f} | {r['warmup_s']:.1f} | {fmt(r.get('vs_first'), '.2f')} |")
    return "\n".join(lines)


def split_list(value: str, choices: tuple[str, ...], flag: str) -> list[str]:
    items = [x for x in value.split(",") if x]
    for x in items:
        if x not in choices:
            raise SystemExit(f"{flag}: {x!r} is not one of {', '.join(choices)}")
    return items


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides key=value (after --config)")
    p.add_argument("--config", default="", help="YAML config (model, optimizer, ...); default: the built-in defaults")
    p.add_argument("--batch", type=int, default=16, help="micro-batch (sequences) per rank per step")
    p.add_argument("--seq", type=int, default=0, help="sequence length; 0 = the config's model.block_size")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--strategies", default="single")
    p.add_argument("--acs", default="none")
    p.add_argument("--compile", dest="compiles", default="off", help="off | default | reduce-overhead | max-autotune")
    p.add_argument("--dtypes", default="auto", help="bf16 | fp32 | fp16 | auto (bf16 on a GPU that has it, else fp32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--nproc", type=int, default=2, help="ranks for ddp and fsdp")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device peak TFLOP/s for MFU; 0 = from the GPU's name (none on CPU)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    p.add_argument("--out", default="", help="write the rows and metadata here (JSON)")
    # internal: one worker in this process
    p.add_argument("--worker-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    p.add_argument("--ac", default="none", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker_dir:
        a.compile = a.compiles
    for key in ("batch", "steps", "nproc", "cores"):
        if getattr(a, key) < 1:
            p.error(f"--{key} must be >= 1")
    if a.warmup < 0 or a.seq < 0 or a.peak_tflops < 0:
        p.error("--warmup, --seq and --peak-tflops must be >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.worker_dir:
        if a.threads:
            torch.set_num_threads(a.threads)
        rec = measure(a)
        Path(a.worker_dir, f"rank{rec['rank']}.json").write_text(json.dumps(rec))
        return 0
    strategies = split_list(a.strategies, STRATEGIES, "--strategies")
    acs = split_list(a.acs, ACS, "--acs")
    compiles = split_list(a.compiles, COMPILE_MODES, "--compile")
    dtypes = split_list(a.dtypes, (*DTYPES, "auto"), "--dtypes")
    if a.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < a.nproc:
        # NCCL needs one GPU per rank.
        print(f"note: {torch.cuda.device_count()} GPU(s) < --nproc {a.nproc}: "
              f"ddp/fsdp run with {torch.cuda.device_count()} rank(s)")
        a.nproc = max(1, torch.cuda.device_count())
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for s, ac, c, d in itertools.product(strategies, acs, compiles, dtypes):
            combo = {"strategy": s, "ac": ac, "compile": c, "dtype": d}
            t0 = time.perf_counter()
            row = launch(a, combo, Path(tmp))
            rows.append(row)
            status = f"{row['tok_per_s']:,.0f} tok/s" if "error" not in row else row["error"]
            print(f"  {s:6s} {ac:9s} {c:15s} {d:4s} {time.perf_counter() - t0:5.0f} s  {status}", flush=True)
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        r["vs_first"] = r["tok_per_s"] / ok[0]["tok_per_s"]
    r0 = ok[0] if ok else {}
    if r0:
        print(f"\nmodel: {r0['params'] / 1e6:.1f}M params, FLOPs/token {r0['flops_per_token'] / 1e6:.1f}M at "
              f"T={r0['seq']}, micro-batch {a.batch}/rank, device {r0['device_name']} ({r0['device']}), peak "
              f"{fmt(r0['peak_tflops_per_device'], '.1f')} TFLOP/s/device, {a.warmup} warm-up + {a.steps} timed "
              f"steps, total {time.perf_counter() - t_all:.0f} s\n")
    print(table(rows))
    if a.out:
        meta = {"args": {k: v for k, v in vars(a).items() if k not in ("worker_dir", "strategy", "ac", "dtype",
                                                                       "threads", "compile")},
                "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                "machine": platform.machine(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                "load_avg_after": os.getloadavg()}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {a.out}")
    return 0 if ok and len(ok) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
