"""CPU demonstration: SFT a small model on 2-digit addition to partial accuracy, then GRPO raises it.

    python tools/rl_demo.py                      # ~4 minutes on 2 CPU cores; writes runs/rl_demo/
    python tools/rl_demo.py --nproc 2            # the GRPO stage under torchrun with 2 ranks

Steps (each a real launcher run, so it exercises exactly what a user runs):
  1. warm-up data: `AdditionTask(level=2).sft_rows(n)` as {"prompt","response"} JSONL;
  2. `launch/sft.py` trains a small byte-level model from scratch on it (few steps: partial accuracy);
  3. `launch/grpo.py --config configs/grpo_addition.yaml` from that checkpoint; its step-0 evaluation is the
     "before" accuracy (greedy, held-out problems the SFT data never contains), the last one the "after".
Outputs in --out: summary.json (accuracies, wall times, commands) and reward_curve.png (reward mean per
step and held-out accuracy). The numbers are whatever the run measured; nothing is tuned after the fact.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(cmd: list[str], log: Path) -> float:
    """Run a launcher from the repo root, its output to `log`; returns the wall time. Exits on failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {p.returncode}; see {log}")
    return dt


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plot(metrics: list[dict], path: Path, title: str) -> None:
    """Reward mean per step (and its running mean) with the held-out accuracy on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if "reward_mean" in m]
    evals = [m for m in metrics if "val/accuracy" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs, ys = [m["step"] for m in steps], [m["reward_mean"] for m in steps]
    ax.plot(xs, ys, color="tab:blue", alpha=0.35, label="train reward (batch mean)")
    k = 10
    smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
    ax.plot(xs, smooth, color="tab:blue", label=f"train reward ({k}-step mean)")
    ax.plot([m["step"] for m in evals], [m["val/accuracy"] for m in evals], "o-", color="tab:red",
            label="held-out accuracy (greedy)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward / accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/rl_demo", help="demo directory (replaced runs are resumed, so use a new one)")
    ap.add_argument("--sft-rows", type=int, default=20000, help="warm-up examples")
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT optimizer steps (64 examples each)")
    ap.add_argument("--grpo-steps", type=int, default=600, help="GRPO optimizer steps (32 prompts x 8 samples)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks for the GRPO stage (torchrun when > 1)")
    ap.add_argument("--grpo-args", nargs="*", default=[], help="extra key=value overrides for launch/grpo.py")
    args = ap.parse_args()

    from llm_dist.rl.tasks import AdditionTask

    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    data = out / "sft_addition.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in AdditionTask(level=2).sft_rows(args.sft_rows)))

    sft = [sys.executable, "launch/sft.py", "model.preset=debug", "model.block_size=32", "model.n_embd=128",
           "tokenizer.name=byte", f"sft.data={data}", "sft.eval_fraction=0.01", "sft.eval_examples=0",
           "train.batch_size=64", "train.micro_batch_size=64", f"train.max_steps={args.sft_steps}",
           "train.dtype=fp32", "optim.lr=3e-3", "optim.warmup_steps=20", "parallel.device=cpu", "eval.interval=0",
           "eval.steps=1", "train.log_interval=50", f"out_dir={out / 'sft'}"]
    t_sft = run(sft, out / "sft.log")
    print(f"sft: {args.sft_steps} steps in {t_sft:.0f}s")

    launcher = [sys.executable] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    grpo = [*launcher, "launch/grpo.py", "--config", "configs/grpo_addition.yaml", f"rl.init_from={out / 'sft'}",
            f"train.max_steps={args.grpo_steps}", f"out_dir={out / 'grpo'}", *args.grpo_args]
    t_grpo = run(grpo, out / "grpo.log")
    metrics = read_metrics(out / "grpo")
    evals = [m for m in metrics if "val/accuracy" in m]
    steps = [m for m in metrics if "reward_mean" in m]
    before, after = evals[0]["val/accuracy"], evals[-1]["val/accuracy"]
    summary = {"accuracy_before": before, "accuracy_after": after,
               "accuracy_curve": {m["step"]: m["val/accuracy"] for m in evals},
               "reward_first10": sum(m["reward_mean"] for m in steps[:10]) / max(len(steps[:10]), 1),
               "reward_last10": sum(m["reward_mean"] for m in steps[-10:]) / max(len(steps[-10:]), 1),
               "wall_s": {"sft": round(t_sft, 1), "grpo": round(t_grpo, 1),
                          "total": round(time.perf_counter() - t_all, 1)},
               "nproc": args.nproc, "commands": {"sft": " ".join(sft[1:]), "grpo": " ".join(grpo[len(launcher):])}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(metrics, out / "reward_curve.png",
         f"GRPO on 2-digit addition: held-out accuracy {before:.1%} -> {after:.1%}")
    print(f"grpo: {args.grpo_steps} steps in {t_grpo:.0f}s; held-out accuracy {before:.1%} -> {after:.1%}; "
          f"train reward {summary['reward_first10']:.3f} (first 10 steps) -> {summary['reward_last10']:.3f} "
          f"(last 10); total {summary['wall_s']['total']:.0f}s; {out / 'summary.json'}, {out / 'reward_curve.png'}")


if __name__ == "__main__":
    main()
