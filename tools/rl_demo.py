"""CPU demonstration: SFT a small model on 2-digit addition to partial accuracy, then GRPO, PPO or DPO raise it.

    python tools/rl_demo.py                      # SFT, then GRPO and PPO from the same SFT checkpoint
    python tools/rl_demo.py --algo ppo --nproc 2 # only PPO, under torchrun with 2 ranks
    python tools/rl_demo.py --algo dpo           # SFT, then DPO on the shipped preference pairs only

Steps (each a real launcher run, so it exercises exactly what a user runs):
  1. warm-up data: `AdditionTask(level=2).sft_rows(n)` as {"prompt","response"} JSONL;
  2. `launch/sft.py` trains a small byte-level model from scratch on it (few steps: partial accuracy);
  3. `launch/grpo.py --config configs/grpo_addition.yaml` and/or `launch/ppo.py --config
     configs/ppo_addition.yaml` from that checkpoint; each one's step-0 evaluation is the "before" accuracy
     (greedy, held-out problems the SFT data never contains), its last one the "after";
  4. `launch/dpo.py --config configs/dpo_addition.yaml` from the same checkpoint, on
     data/preferences/addition_l2*.jsonl only (no rollouts, no task reward): its val/exact_match on the
     first 500 held-out pairs' prompts, which are the same 500 problems the RL stages score.
Outputs in --out: summary.json (accuracies, wall times, commands) and <algo>_reward_curve.png (reward mean
per step and held-out accuracy; for DPO its implicit reward margin and accuracy). The numbers are whatever
the runs measured; nothing is tuned after the fact.
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


def plot(metrics: list[dict], path: Path, title: str, algo: str = "GRPO") -> None:
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
    _finish(fig, ax, path, title, f"{algo} step", "reward / accuracy")


def _finish(fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:  # noqa: ANN001 - matplotlib
    """Axes on [0, 1] with grid, legend and title; the figure written to `path`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_rl(algo: str, out: Path, sft_dir: Path, a: argparse.Namespace) -> dict:
    """One RL stage from the SFT checkpoint; its before/after accuracy, reward curve and wall time."""
    launcher = [sys.executable] if a.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
    steps = a.grpo_steps if algo == "grpo" else a.ppo_steps
    cmd = [*launcher, f"launch/{algo}.py", "--config", f"configs/{algo}_addition.yaml", f"rl.init_from={sft_dir}",
           f"train.max_steps={steps}", f"out_dir={out / algo}", *(a.grpo_args if algo == "grpo" else a.ppo_args)]
    wall = run(cmd, out / f"{algo}.log")
    metrics = read_metrics(out / algo)
    evals = [m for m in metrics if "val/accuracy" in m]
    rewards = [m["reward_mean"] for m in metrics if "reward_mean" in m]
    before, after = evals[0]["val/accuracy"], evals[-1]["val/accuracy"]
    plot(metrics, out / f"{algo}_reward_curve.png",
         f"{algo.upper()} on 2-digit addition: held-out accuracy {before:.1%} -> {after:.1%}", algo.upper())
    res = {"accuracy_before": before, "accuracy_after": after,
           "accuracy_curve": {m["step"]: m["val/accuracy"] for m in evals},
           "reward_first10": sum(rewards[:10]) / max(len(rewards[:10]), 1),
           "reward_last10": sum(rewards[-10:]) / max(len(rewards[-10:]), 1),
           "wall_s": round(wall, 1), "steps": steps, "command": " ".join(cmd[len(launcher):])}
    print(f"{algo}: {steps} steps in {wall:.0f}s; held-out accuracy {before:.1%} -> {after:.1%}; train reward "
          f"{res['reward_first10']:.3f} (first 10 steps) -> {res['reward_last10']:.3f} (last 10)")
    return res


def plot_dpo(metrics: list[dict], path: Path, title: str) -> None:
    """DPO's implicit reward accuracy per step with the held-out exact match on the same axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if "rewards/accuracies" in m]
    evals = [m for m in metrics if "val/exact_match" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in steps], [m["rewards/accuracies"] for m in steps], color="tab:blue", alpha=0.6,
            label="train rewards/accuracies (chosen ranked first)")
    ax.plot([m["step"] for m in evals], [m["val/rewards/accuracies"] for m in evals], "s--", color="tab:blue",
            label="held-out rewards/accuracies")
    ax.plot([m["step"] for m in evals], [m["val/exact_match"] for m in evals], "o-", color="tab:red",
            label="held-out accuracy (greedy exact match)")
    _finish(fig, ax, path, title, "DPO step", "accuracy")


def run_dpo(out: Path, sft_dir: Path, a: argparse.Namespace) -> dict:
    """DPO from the SFT checkpoint on the shipped preference pairs; before/after held-out exact match."""
    launcher = [sys.executable] if a.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
    cmd = [*launcher, "launch/dpo.py", "--config", "configs/dpo_addition.yaml", f"dpo.init_from={sft_dir}",
           f"train.max_steps={a.dpo_steps}", f"out_dir={out / 'dpo'}", *a.dpo_args]
    wall = run(cmd, out / "dpo.log")
    metrics = read_metrics(out / "dpo")
    evals = [m for m in metrics if "val/exact_match" in m]
    before, after = evals[0]["val/exact_match"], evals[-1]["val/exact_match"]
    plot_dpo(metrics, out / "dpo_reward_curve.png",
             f"DPO on 2-digit addition pairs: held-out accuracy {before:.1%} -> {after:.1%}")
    res = {"accuracy_before": before, "accuracy_after": after,
           "accuracy_curve": {m["step"]: m["val/exact_match"] for m in evals},
           "val_reward_accuracy_before": evals[0]["val/rewards/accuracies"],
           "val_reward_accuracy_after": evals[-1]["val/rewards/accuracies"],
           "val_logps_chosen_before": evals[0]["val/logps/chosen"],
           "val_logps_chosen_after": evals[-1]["val/logps/chosen"],
           "wall_s": round(wall, 1), "steps": a.dpo_steps, "command": " ".join(cmd[len(launcher):])}
    print(f"dpo: {a.dpo_steps} steps in {wall:.0f}s; held-out accuracy {before:.1%} -> {after:.1%}; held-out "
          f"rewards/accuracies {res['val_reward_accuracy_before']:.3f} -> {res['val_reward_accuracy_after']:.3f}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/rl_demo", help="demo directory (replaced runs are resumed, so use a new one)")
    ap.add_argument("--algo", choices=("grpo", "ppo", "dpo", "both", "all"), default="both",
                    help="stage(s) after the SFT: both = grpo + ppo; all = grpo + ppo + dpo")
    ap.add_argument("--sft-rows", type=int, default=20000, help="warm-up examples")
    ap.add_argument("--sft-steps", type=int, default=300, help="SFT optimizer steps (64 examples each)")
    ap.add_argument("--grpo-steps", type=int, default=600, help="GRPO optimizer steps (32 prompts x 8 samples)")
    ap.add_argument("--ppo-steps", type=int, default=600, help="PPO optimizer steps (4 per rollout of 256 samples)")
    ap.add_argument("--dpo-steps", type=int, default=300, help="DPO optimizer steps (64 pairs each)")
    ap.add_argument("--nproc", type=int, default=1, help="ranks for the RL stages (torchrun when > 1)")
    ap.add_argument("--grpo-args", nargs="*", default=[], help="extra key=value overrides for launch/grpo.py")
    ap.add_argument("--ppo-args", nargs="*", default=[], help="extra key=value overrides for launch/ppo.py")
    ap.add_argument("--dpo-args", nargs="*", default=[], help="extra key=value overrides for launch/dpo.py")
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
    algos = {"both": ("grpo", "ppo"), "all": ("grpo", "ppo", "dpo")}.get(args.algo, (args.algo,))
    summary = {"nproc": args.nproc, "sft": {"wall_s": round(t_sft, 1), "command": " ".join(sft[1:])},
               **{algo: run_dpo(out, out / "sft", args) if algo == "dpo" else run_rl(algo, out, out / "sft", args)
                  for algo in algos}}
    summary["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"total {summary['total_wall_s']:.0f}s; {out / 'summary.json'}")


if __name__ == "__main__":
    main()
