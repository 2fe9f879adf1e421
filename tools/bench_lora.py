"""LoRA vs full fine-tuning on the same model: trainable parameters, gradient and optimizer-state memory,
checkpoint size and step time, as ratios against full fine-tuning measured by the same command.

    python tools/bench_lora.py                                   # ~11M-parameter model (6 x 384), CPU or GPU
    python tools/bench_lora.py --ranks 8,64 --batch 8 --seq 512 --out runs/bench_lora.json
    python tools/bench_lora.py --compile                         # the same under torch.compile
    python tools/bench_lora.py model.n_layer=12 model.n_embd=768  # trailing key=value config overrides

Each variant builds the model exactly as a fine-tuning stage does (`build_parallel_model` with `model.lora`,
`Trainer`: the step SFT runs -- forward, backward, clipping, AdamW) and times --steps train steps on random
tokens after --warmup untimed ones (each step ends in a host sync). Variants: full fine-tuning, then LoRA
for every --ranks value and every --targets set.

Figures per variant:
  trainable      parameters with requires_grad (what gets gradients and AdamW state)
  optim state    bytes of the optimizer's state tensors after a step (AdamW: 2 moments + step counts)
  grads          bytes of the gradients (= the trainable parameters' bytes)
  checkpoint     bytes of the tensors a checkpoint stores (full: weights + optimizer; LoRA: adapters + theirs)
  step           median step time; peak mem: CUDA max allocated over the timed steps (not measured on CPU)
  vs full        each figure over full fine-tuning's
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# ~11M parameters, almost all in the blocks LoRA adapts (a byte-sized vocabulary keeps the frozen LM head small).
DEFAULT_MODEL = ["model.n_layer=6", "model.n_embd=384", "model.n_head=6", "model.vocab_size=512"]


def _bytes(tensors) -> int:  # noqa: ANN001 - any iterable of tensors
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure(overrides: list[str], a: argparse.Namespace, rt) -> dict[str, Any]:  # noqa: ANN001 - Runtime
    """One variant in this process: build, one step (optimizer state exists), warm-up, timed steps."""
    from llm_dist.checkpoint.sharded import model_optim_state
    from llm_dist.config import load_config
    from llm_dist.parallel import build_parallel_model
    from llm_dist.train.trainer import Trainer, resolve_dtype

    cfg = load_config(None, [*DEFAULT_MODEL, f"model.block_size={a.seq}", f"train.batch_size={a.batch}",
                             f"train.micro_batch_size={a.batch}", f"train.dtype={a.dtype}", "optim.warmup_steps=0",
                             f"train.compile={'true' if a.compile else 'false'}", *a.overrides, *overrides]
                      ).validate()
    amp = resolve_dtype(cfg.train.dtype, rt.device)
    pm = build_parallel_model(cfg, rt, amp)
    trainer = Trainer(cfg, rt, pm, amp_dtype=amp)
    g = torch.Generator(device=rt.device).manual_seed(0)

    def batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.randint(0, cfg.model.vocab_size, (a.batch, a.seq + 1), generator=g, device=rt.device)
        return [(x[:, :-1], x[:, 1:])]

    cuda = rt.device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(max(1, a.warmup)):
        trainer.train_step(batch())
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        s0 = time.perf_counter()
        trainer.train_step(batch())  # ends in a host sync
        times.append(time.perf_counter() - s0)
    trainable = [p for p in pm.model.parameters() if p.requires_grad]
    optim_bytes = _bytes(v for st in trainer.optimizer.state.values() for v in st.values())
    ckpt = model_optim_state(pm.model, trainer.optimizer, trainable_only=cfg.model.lora.rank > 0)
    ckpt_bytes = _bytes(ckpt["model"].values()) + _bytes(v for st in ckpt["optim"]["state"].values()
                                                         for v in st.values())
    rec = {
        "variant": f"lora r={cfg.model.lora.rank} {cfg.model.lora.targets}" if cfg.model.lora.rank else "full",
        "params": pm.model.num_params(), "trainable": sum(p.numel() for p in trainable),
        "grad_bytes": _bytes(trainable), "optim_state_bytes": optim_bytes, "checkpoint_bytes": ckpt_bytes,
        "warmup_s": warmup_s, "step_time_median_s": statistics.median(times),
        "peak_mem_gib": torch.cuda.max_memory_allocated(rt.device) / 2**30 if cuda else None,
    }
    del trainer, pm
    if cuda:
        torch.cuda.empty_cache()
    return rec


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def table(rows: list[dict[str, Any]]) -> str:
    full = rows[0]
    head = (f"{'variant':<34} {'trainable':>12} {'optim state':>12} {'grads':>11} {'checkpoint':>11} "
            f"{'step':>9} {'peak mem':>9} | vs full: {'train':>7} {'optim':>7} {'ckpt':>7} {'step':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mem = f"{r['peak_mem_gib']:.2f}G" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"{r['variant']:<34} {r['trainable']:>12,} {_fmt_bytes(r['optim_state_bytes']):>12} "
                     f"{_fmt_bytes(r['grad_bytes']):>11} {_fmt_bytes(r['checkpoint_bytes']):>11} "
                     f"{r['step_time_median_s'] * 1e3:>7.1f}ms {mem:>9} | {'':>9}"
                     f"{r['trainable'] / full['trainable']:>7.4f} {r['optim_state_bytes'] / full['optim_state_bytes']:>7.4f} "
                     f"{r['checkpoint_bytes'] / full['checkpoint_bytes']:>7.4f} "
                     f"{r['step_time_median_s'] / full['step_time_median_s']:>6.2f}")
    return "\n".join(lines)


def _ranks(text: str) -> list[int]:
    from llm_dist.cli_args import positive_int

    return [positive_int(r) for r in text.split(",")]


_ranks.__name__ = "comma-separated positive integers"  # what argparse's one-line error says was expected


def main(argv: list[str] | None = None) -> int:
    from llm_dist.cli_args import ArgumentParser, nonnegative_int, positive_int
    from llm_dist.distributed import runtime

    ap = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="\n".join(__doc__.split("\n")[2:]))
    ap.add_argument("--ranks", type=_ranks, default=[8], help="comma-separated LoRA ranks to compare with full fine-tuning")
    ap.add_argument("--targets", default="wq,wk,wv,wo;wq,wk,wv,wo,up,down",
                    help="semicolon-separated target sets (model.lora.targets values)")
    ap.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=positive_int, default=256, help="tokens per sequence (model.block_size)")
    ap.add_argument("--steps", type=positive_int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps first (compilation, lazy init)")
    ap.add_argument("--dtype", default="auto", help="train.dtype (auto: bf16 on a GPU that has it, else fp32)")
    ap.add_argument("--compile", action="store_true", help="train.compile=true for every variant")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", default="", help="also write the records as JSON here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every variant (the model)")
    a = ap.parse_args(argv)
    variants = [["model.lora.rank=0"]] + [[f"model.lora.rank={r}", f"model.lora.targets={t}", "model.lora.alpha=16"]
                                          for r in a.ranks for t in a.targets.split(";")]
    with runtime(a.device) as rt:
        rows = [measure(v, a, rt) for v in variants]
        device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu"
    env = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "batch": a.batch, "seq": a.seq, "compile": a.compile,
           "overrides": DEFAULT_MODEL + a.overrides}
    print(f"{rows[0]['params']:,}-parameter model, batch {a.batch} x {a.seq} tokens on {device} "
          f"({env['threads']} threads), torch {torch.__version__}{', compiled' if a.compile else ''}")
    print(table(rows))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    from llm_dist.cli import tool_main  # a bad override or config: one line, exit 2

    sys.exit(tool_main(main))
