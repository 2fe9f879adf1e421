"""Kernel benchmarks on a GPU: FlashAttention vs SDPA, fused vs unfused cross-entropy, RMSNorm bandwidth, GPT-2 step.

    python tools/bench_kernels.py                                  # everything, default shapes (H100: ~5 min)
    python tools/bench_kernels.py --only attention --seq 1024,2048,4096 --out runs/bench_kernels.json
    python tools/bench_kernels.py --interpret                      # CPU smoke run of this script (tiny shapes)
    LLM_DIST_AUTOTUNE=full python tools/bench_kernels.py --only attention   # tune over the whole space

Every row is a ratio against a baseline measured in the same process on the same card:

attention  (batch 4, causal, bf16; head dim 64 with 32 heads and 128 with 16 heads, T = 1k..16k) the Triton
           kernels vs `F.scaled_dot_product_attention` restricted to its flash backend (`sdpa_*`, the
           `fwd_ratio` / `bwd_ratio` columns) and to its cuDNN backend (`cudnn_*`; null where this torch
           or card has none). TFLOP/s with the FlashAttention convention: forward 4*B*H*T^2*D / 2 (causal),
           backward 2.5x the forward. Goal (H100/H200, D=128, T >= 4k): forward and backward >= 1.0x the
           faster of the two (`fwd_vs_best`, `bwd_vs_best`). Also the first Triton call at each shape
           (`first_call_s`, which includes choosing launch configs unless the autotune cache has them;
           `tuned` says how many kernels were timed) and then a new length in the same bucket
           (`new_length_s`, T - 8: should reuse everything).
cross-ent  (8192 tokens; hidden 768 / vocab 50,304 and hidden 4096 / vocab 128,256, bf16) forward+backward
           of the chunked linear + cross-entropy vs logits = h W^T then F.cross_entropy on fp32 logits,
           eagerly (`unfused_*`, the `time_ratio` / `mem_ratio` columns) and under torch.compile
           (`compiled_*`, the goal's baseline): time and peak memory above the inputs. Both paths return
           the same dH, dW, so `*_workspace_mib` is the peak less those gradients. Goals: time <= 1.10x
           and peak <= 25% of the compiled loss (`time_vs_compiled`, `mem_vs_compiled`).
           `--ce-chunks 0,2048,...` times the fused loss at several chunk sizes (0 = the auto rule).
rmsnorm    (16k rows x 2048/4096/8192, bf16) GB/s of the fused forward and backward against the copy
           bandwidth measured on the same card (a large device-to-device copy), and the PyTorch module.
           Goal: >= 80% of the measured bandwidth.
e2e        GPT-2 124M training steps (micro-batch 8 x 1024, bf16 autocast, AdamW): attn_impl=triton +
           loss.impl=fused vs sdpa + torch: tokens/s and peak memory.

Without CUDA the script stops with one line, unless `--interpret` asks for the CPU smoke run, which sets
TRITON_INTERPRET=1 and runs each section once at toy shapes (torch.compile with the "eager" backend, no
C++ toolchain needed): it checks the script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def bench(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after two warm-ups (CUDA events on a GPU)."""
    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def wall(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of `fn`, synchronised (for first calls: compiling and tuning included)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def peak_mem(fn: Callable[[], object], device: str) -> int:
    """Bytes allocated at the peak of `fn` above what was allocated before it (0 off CUDA)."""
    import torch

    if device != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# --------------------------------------------------------------------------------------------- attention

ATTN_HEADS = ((64, 32), (128, 16))  # (head dim, heads) of the attention section


def bench_attention(args: argparse.Namespace, device: str) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llm_dist.kernels.flash_attention import _TUNERS, flash_attention_triton

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backends = {"sdpa": SDPBackend.FLASH_ATTENTION, "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}
    rows = []
    for D, H in ATTN_HEADS:
        for T in args.seq:
            B = args.batch
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn_like(q)
            fwd_flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
            res = {"section": "attention", "B": B, "H": H, "T": T, "D": D, "dtype": str(dtype)[6:]}

            def run(impl: str, backward: bool, q=q, k=k, v=v, do=do) -> Callable[[], object]:  # noqa: ANN001
                def f() -> object:
                    if impl == "triton":
                        o = flash_attention_triton(q, k, v, causal=True)
                    else:
                        with sdpa_kernel(backends[impl]):
                            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    if backward:
                        torch.autograd.grad(o, (q, k, v), do)
                    return o
                return f

            tuned0 = sum(t.tuned for t in _TUNERS.values())
            res["first_call_s"] = wall(run("triton", True), device)
            res["tuned"] = sum(t.tuned for t in _TUNERS.values()) - tuned0
            q2, k2, v2, do2 = (x.detach()[:, :, : T - 8].clone().requires_grad_() for x in (q, k, v, do))
            tuned0 = sum(t.tuned for t in _TUNERS.values())
            res["new_length_s"] = wall(run("triton", True, q2, k2, v2, do2.detach()), device)
            res["new_length_tuned"] = sum(t.tuned for t in _TUNERS.values()) - tuned0
            del q2, k2, v2, do2
            for impl in ("triton", "sdpa", "cudnn"):
                try:
                    if impl != "triton" and backends[impl] is None:
                        raise RuntimeError(f"this torch has no SDPBackend for {impl}")
                    t_f = bench(run(impl, False), device, args.repeats)
                    t_fb = bench(run(impl, True), device, args.repeats)
                except RuntimeError as e:  # no cuDNN attention in this build / for this card or shape
                    if impl == "triton":
                        raise
                    res[f"{impl}_fwd_tflops"] = res[f"{impl}_bwd_tflops"] = None
                    res[f"{impl}_error"] = str(e).splitlines()[0][:200]
                    continue
                t_b = max(t_fb - t_f, 1e-9)
                res[f"{impl}_fwd_tflops"] = fwd_flops / t_f / 1e12
                res[f"{impl}_bwd_tflops"] = 2.5 * fwd_flops / t_b / 1e12
            res["fwd_ratio"] = res["triton_fwd_tflops"] / res["sdpa_fwd_tflops"]
            res["bwd_ratio"] = res["triton_bwd_tflops"] / res["sdpa_bwd_tflops"]
            for d in ("fwd", "bwd"):
                best = max(x for x in (res["sdpa_" + d + "_tflops"], res["cudnn_" + d + "_tflops"]) if x is not None)
                res[f"{d}_vs_best"] = res[f"triton_{d}_tflops"] / best
            def cud(d: str, res: dict = res) -> str:
                x = res[f"cudnn_{d}_tflops"]
                return f"{x:7.1f}" if x is not None else "    n/a"

            print(f"attention B={B} H={H:>2} D={D:>3} T={T:>5}: fwd {res['triton_fwd_tflops']:7.1f} vs flash "
                  f"{res['sdpa_fwd_tflops']:7.1f} / cuDNN {cud('fwd')} TFLOP/s ({res['fwd_vs_best']:.2f}x best) | bwd "
                  f"{res['triton_bwd_tflops']:7.1f} vs {res['sdpa_bwd_tflops']:7.1f} / {cud('bwd')} "
                  f"({res['bwd_vs_best']:.2f}x) | first call {res['first_call_s']:.1f} s ({res['tuned']} tuned), "
                  f"T-8 {res['new_length_s']:.2f} s ({res['new_length_tuned']} tuned)", flush=True)
            rows.append(res)
            del q, k, v, do
    return rows


# ----------------------------------------------------------------------------------------- cross-entropy

def bench_cross_entropy(args: argparse.Namespace, device: str) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from llm_dist.kernels import auto_chunk_size, linear_cross_entropy

    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def unfused_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((h @ w.t()).float(), t, reduction="sum")  # (N, V) logits, fp32 softmax

    # The goal's baseline: the same function compiled (inductor on a GPU; "eager" in the CPU smoke run).
    compiled_loss = torch.compile(unfused_loss, backend="inductor" if device == "cuda" else "eager", dynamic=False)
    rows = []
    for C, V in args.ce_shapes:
        N = args.ce_tokens
        h = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, C, device=device, dtype=dtype) / C ** 0.5).requires_grad_()
        t = torch.randint(0, V, (N,), device=device)
        grads_mib = (h.numel() + w.numel()) * h.element_size() / 2 ** 20  # dH + dW: returned by every path

        def unfused() -> None:
            torch.autograd.grad(unfused_loss(h, w, t), (h, w))

        def compiled() -> None:
            torch.autograd.grad(compiled_loss(h, w, t), (h, w))

        def fused(chunk: int = 0) -> Callable[[], None]:
            return lambda: torch.autograd.grad(linear_cross_entropy(h, w, t, chunk_size=chunk), (h, w))

        base = {"section": "cross_entropy", "tokens": N, "hidden": C, "vocab": V, "dtype": str(dtype)[6:]}
        ref = {}
        for name, fn in (("unfused", unfused), ("compiled", compiled)):
            ref[f"{name}_ms"] = bench(fn, device, args.repeats) * 1e3
            ref[f"{name}_peak_mib"] = peak_mem(fn, device) / 2 ** 20
            ref[f"{name}_workspace_mib"] = max(ref[f"{name}_peak_mib"] - grads_mib, 0.0)
        for chunk in args.ce_chunks:
            res = {**base, "chunk": chunk or auto_chunk_size(N, C, V), "chunk_rule": "auto" if chunk == 0 else "fixed",
                   **ref}
            res["fused_ms"] = bench(fused(chunk), device, args.repeats) * 1e3
            res["fused_peak_mib"] = peak_mem(fused(chunk), device) / 2 ** 20
            res["fused_workspace_mib"] = max(res["fused_peak_mib"] - grads_mib, 0.0)
            res["time_ratio"] = res["fused_ms"] / res["unfused_ms"]
            res["mem_ratio"] = res["fused_peak_mib"] / max(res["unfused_peak_mib"], 1e-9)
            res["time_vs_compiled"] = res["fused_ms"] / res["compiled_ms"]
            res["mem_vs_compiled"] = res["fused_peak_mib"] / max(res["compiled_peak_mib"], 1e-9)
            res["workspace_vs_compiled"] = res["fused_workspace_mib"] / max(res["compiled_workspace_mib"], 1e-9)
            print(f"cross-entropy N={N} C={C} V={V} chunk={res['chunk']} ({res['chunk_rule']}): fused "
                  f"{res['fused_ms']:.2f} ms, peak {res['fused_peak_mib']:.0f} MiB | compiled "
                  f"{res['compiled_ms']:.2f} ms, "
                  f"peak {res['compiled_peak_mib']:.0f} MiB | eager {res['unfused_ms']:.2f} ms, peak "
                  f"{res['unfused_peak_mib']:.0f} MiB | vs compiled: time {res['time_vs_compiled']:.2f}x, memory "
                  f"{res['mem_vs_compiled']:.2f}x (without the dH/dW both return: {res['workspace_vs_compiled']:.2f}x)",
                  flush=True)
            rows.append(res)
        del h, w, t
    return rows


# --------------------------------------------------------------------------------------------- rmsnorm

def bench_rmsnorm(args: argparse.Namespace, device: str) -> list[dict]:
    import torch

    from llm_dist.kernels.rmsnorm import BWD_TILE, launch_params, rms_norm_triton
    from llm_dist.model.layers import RMSNorm

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    es = torch.finfo(dtype).bits // 8
    big = torch.empty(args.copy_mib * 2 ** 20 // es, device=device, dtype=dtype)
    dst = torch.empty_like(big)
    t_copy = bench(lambda: dst.copy_(big), device, args.repeats)
    copy_gbs = 2 * big.numel() * es / t_copy / 1e9  # read + write
    del big, dst
    print(f"rmsnorm: measured copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for C in args.norm_dims:
        M = args.norm_rows
        x = torch.randn(M, C, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(C, device=device, requires_grad=True)
        dy = torch.randn_like(x)
        module = RMSNorm(C).to(device)
        block, rows_fwd, warps = launch_params(C)
        res = {"section": "rmsnorm", "rows": M, "dim": C, "dtype": str(dtype)[6:], "copy_gbs": copy_gbs,
               "rows_per_program_fwd": rows_fwd, "rows_per_program_bwd": launch_params(C, BWD_TILE)[1],
               "num_warps_fwd": warps}
        for name, f in (("fused", lambda: rms_norm_triton(x, w, 1e-5)), ("torch", lambda: module(x))):
            t_f = bench(f, device, args.repeats)
            y = f()
            t_b = bench(lambda: torch.autograd.grad(y, (x,), dy, retain_graph=True), device, args.repeats)
            res[f"{name}_fwd_gbs"] = 2 * M * C * es / t_f / 1e9  # read x, write y
            res[f"{name}_bwd_gbs"] = 3 * M * C * es / t_b / 1e9  # read x and dy, write dx
        res["fwd_of_copy"] = res["fused_fwd_gbs"] / copy_gbs
        res["bwd_of_copy"] = res["fused_bwd_gbs"] / copy_gbs
        print(f"rmsnorm {M}x{C}: fused fwd {res['fused_fwd_gbs']:.0f} GB/s ({res['fwd_of_copy']:.0%} of copy), bwd "
              f"{res['fused_bwd_gbs']:.0f} GB/s ({res['bwd_of_copy']:.0%}) | torch fwd {res['torch_fwd_gbs']:.0f}, bwd "
              f"{res['torch_bwd_gbs']:.0f} GB/s", flush=True)
        rows.append(res)
    return rows


# ------------------------------------------------------------------------------------------------- e2e

def bench_e2e(args: argparse.Namespace, device: str) -> list[dict]:
    import torch

    from llm_dist.config import ModelConfig
    from llm_dist.model.presets import get_preset
    from llm_dist.model.transformer import build_model
    from llm_dist.train.trainer import causal_lm_loss

    B, T = args.e2e_batch, args.e2e_seq
    rows = []
    for attn, loss_impl in (("sdpa", "torch"), ("triton", "fused")):
        cfg = ModelConfig(vocab_size=args.e2e_vocab, **{**get_preset(args.e2e_preset), "block_size": T})
        cfg.attn_impl = attn
        model = build_model(cfg, device, seed=0)
        model.loss_impl = loss_impl
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        x = torch.randint(0, args.e2e_vocab, (B, T), device=device)
        y = torch.randint(0, args.e2e_vocab, (B, T), device=device)
        amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

        def step() -> None:
            with amp:
                loss, n = causal_lm_loss(model, (x, y))
            (loss / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        t = bench(step, device, args.repeats)
        mem = peak_mem(step, device)
        res = {"section": "e2e", "preset": args.e2e_preset, "attn_impl": attn, "loss_impl": loss_impl, "B": B, "T": T,
               "tokens_per_s": B * T / t, "step_ms": t * 1e3, "peak_mib": mem / 2 ** 20}
        print(f"e2e {args.e2e_preset} B={B} T={T} attn={attn:<6} loss={loss_impl:<5}: {res['tokens_per_s']:,.0f} tok/s, "
              f"{res['step_ms']:.1f} ms/step, peak {res['peak_mib']:.0f} MiB (above weights + optimizer state)", flush=True)
        rows.append(res)
        del model, opt
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


SECTIONS = {"attention": bench_attention, "cross_entropy": bench_cross_entropy, "rmsnorm": bench_rmsnorm, "e2e": bench_e2e}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark the Triton kernels against PyTorch on a GPU.")
    ap.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--seq", type=_ints, default=[1024, 2048, 4096, 8192, 16384], help="attention: sequence lengths")
    ap.add_argument("--batch", type=int, default=4, help="attention: batch")
    ap.add_argument("--ce-tokens", type=int, default=8192, help="cross-entropy: tokens")
    ap.add_argument("--ce-chunks", type=_ints, default=[0], help="cross-entropy: fused chunk sizes in rows (0 = auto)")
    ap.add_argument("--norm-rows", type=int, default=16384, help="rmsnorm: rows")
    ap.add_argument("--norm-dims", type=_ints, default=[2048, 4096, 8192], help="rmsnorm: widths")
    ap.add_argument("--copy-mib", type=int, default=1024, help="rmsnorm: size of the bandwidth-ceiling copy")
    ap.add_argument("--e2e-preset", default="gpt2-124M", help="e2e: model preset")
    ap.add_argument("--e2e-batch", type=int, default=8)
    ap.add_argument("--e2e-seq", type=int, default=1024)
    ap.add_argument("--e2e-vocab", type=int, default=50257, help="e2e: vocabulary (GPT-2's)")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    ap.add_argument("--interpret", action="store_true", help="CPU smoke run under Triton's interpreter, toy shapes")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    args.ce_shapes = [(768, 50304), (4096, 128256)]
    sections = [s for s in args.only.split(",") if s] or list(SECTIONS)
    for s in sections:
        if s not in SECTIONS:
            print(f"bench_kernels: --only {s!r} is not one of {', '.join(SECTIONS)}", file=sys.stderr)
            return 2

    if args.interpret:  # must precede the first import of triton / the kernel modules
        os.environ["TRITON_INTERPRET"] = "1"
        args.seq, args.batch, args.repeats = [40], 1, 1
        args.ce_tokens, args.ce_shapes = 64, [(16, 300)]
        args.norm_rows, args.norm_dims, args.copy_mib = 16, [64], 1
        args.e2e_preset, args.e2e_batch, args.e2e_seq, args.e2e_vocab = "debug", 1, 32, 256
    import torch

    from llm_dist.kernels import triton_installed

    if not triton_installed():
        print("bench_kernels: triton is not installed (pip install 'llm_dist[kernels]')", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.interpret:
        print("bench_kernels: needs a CUDA GPU (this machine has none); --interpret runs a CPU smoke test instead",
              file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() and not args.interpret else "cpu"
    if args.interpret:
        # Small heads so the smoke run takes seconds; the GPU shapes are the documented ones.
        SECTIONS["attention"] = _interpret_attention
    import triton

    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'}), "
            "Triton interpreter: timings meaningless", "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__}
    print(f"bench_kernels on {meta['device']} | torch {meta['torch']} | triton {meta['triton']}", flush=True)
    results = {"meta": meta}
    for s in sections:
        results[s] = SECTIONS[s](args, device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


def _interpret_attention(args: argparse.Namespace, device: str) -> list[dict]:
    """The attention section at interpreter scale: 2 heads of dim 32 (the GPU run uses 16/32 heads of 64/128)."""
    import torch

    from llm_dist.kernels import attention_reference
    from llm_dist.kernels.flash_attention import flash_attention_triton

    q, k, v = (torch.randn(1, 2, args.seq[0], 32, requires_grad=True) for _ in range(3))
    t = bench(lambda: flash_attention_triton(q, k, v).sum().backward(), device, 1)
    err = (flash_attention_triton(q, k, v) - attention_reference(q, k, v)[0]).abs().max().item()
    print(f"attention smoke: T={args.seq[0]} fwd+bwd {t:.2f} s in the interpreter, max |O - reference| = {err:.1e}")
    return [{"section": "attention", "T": args.seq[0], "smoke_seconds": t, "max_abs_err": err}]


if __name__ == "__main__":
    sys.exit(main())
