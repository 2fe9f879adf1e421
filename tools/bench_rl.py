"""Where an RL step's time goes: generation vs scoring vs optimisation, and generation tokens/s, for GRPO and PPO.

    python tools/bench_rl.py                                  # makes a small SFT policy, then 12 steps of each
    python tools/bench_rl.py --init runs/rl_demo/sft --steps 24 --nproc 2 --out runs/bench_rl.json

Each algorithm runs as a real launcher (`launch/grpo.py`, `launch/ppo.py`; torchrun with --nproc > 1) with
`train.log_interval=1`, and the split is read from its metrics.jsonl. Per rollout, on rank 0:
  generate   sampling the completions with the KV-cache generator (`time_generate`)
  score      rewards + the no-grad forwards for old log-probs / reference / values + advantages (`time_score`)
  optimise   the rest of the rollout's wall time: the optimizer steps it feeds (forward, backward, all-reduce,
             AdamW), i.e. the sum of its steps' `step_time` minus generate and score
Shares are of the rollout's total; gen tok/s = completion tokens of all ranks per second of sampling. The first
rollout (warm-up: allocator, first-call overheads) is left out of the averages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sh(cmd: list[str]) -> None:
    p = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")


def make_policy(tmp: Path) -> Path:
    """A byte-level model SFT-ed briefly on 2-digit addition (as tools/rl_demo.py, fewer steps)."""
    from llm_dist.rl.tasks import AdditionTask

    data = tmp / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in AdditionTask(level=2).sft_rows(4000)))
    sh([sys.executable, "launch/sft.py", "model.preset=debug", "model.block_size=32", "model.n_embd=128",
        "tokenizer.name=byte", f"sft.data={data}", "sft.eval_examples=0", "train.batch_size=64",
        "train.micro_batch_size=64", "train.max_steps=60", "train.dtype=fp32", "optim.lr=3e-3",
        "parallel.device=cpu", "eval.interval=0", f"out_dir={tmp / 'sft'}"])
    return tmp / "sft"


def split(metrics: list[dict], steps_per_rollout: int) -> list[dict]:
    """Per rollout: generate / score / optimise seconds and generation tokens/s."""
    steps = [m for m in metrics if "time_generate" in m]
    out = []
    for i in range(0, len(steps) - steps_per_rollout + 1, steps_per_rollout):
        group = steps[i:i + steps_per_rollout]
        gen, score = group[0]["time_generate"], group[0]["time_score"]
        total = sum(m["step_time"] for m in group)
        out.append({"generate_s": gen, "score_s": score, "optimise_s": max(total - gen - score, 0.0),
                    "total_s": total, "gen_tok_per_s": group[0]["gen_tok_per_s"]})
    return out


def run_algo(algo: str, init: Path, a: argparse.Namespace, tmp: Path) -> dict:
    launcher = [sys.executable] if a.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
    common = [f"rl.init_from={init}", "rl.eval_examples=0", f"train.max_steps={a.steps}", "train.log_interval=1",
              "checkpoint.interval=0", f"train.batch_size={a.batch}", f"train.micro_batch_size={a.micro}",
              f"out_dir={tmp / algo}"]
    if algo == "grpo":
        cmd = [*launcher, "launch/grpo.py", "--config", "configs/grpo_addition.yaml", *common]
        per = 1
    else:
        cmd = [*launcher, "launch/ppo.py", "--config", "configs/ppo_addition.yaml", *common]
        per = 4  # ppo_addition.yaml: 2 epochs x 2 minibatches
    t0 = time.perf_counter()
    sh(cmd)
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (tmp / algo / "metrics.jsonl").read_text().splitlines()]
    rows = split(metrics, per)[1:]  # drop the warm-up rollout
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return {"algo": algo, "rollouts": len(rows), "steps_per_rollout": per, "wall_s": wall, **mean,
            "command": " ".join(cmd[len(launcher):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default="", help="SFT checkpoint or run dir (default: make a small one)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per algorithm (PPO: 4 per rollout)")
    ap.add_argument("--batch", type=int, default=128, help="samples per rollout (train.batch_size)")
    ap.add_argument("--micro", type=int, default=32, help="train.micro_batch_size")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun when > 1)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        init = Path(a.init) if a.init else make_policy(tmp)
        results = [run_algo(algo, init, a, tmp) for algo in ("grpo", "ppo")]
    print(f"\nRL step time split ({a.batch} samples per rollout, {a.nproc} rank(s); mean over rollouts 2..)")
    print("| algo | rollouts | generate s | score s | optimise s | generate | score | optimise | gen tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        t = r["total_s"]
        print(f"| {r['algo']} | {r['rollouts']} | {r['generate_s']:.2f} | {r['score_s']:.2f} | {r['optimise_s']:.2f} | "
              f"{r['generate_s'] / t:.0%} | {r['score_s'] / t:.0%} | {r['optimise_s'] / t:.0%} | "
              f"{r['gen_tok_per_s']:,.0f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"nproc": a.nproc, "batch": a.batch, "results": results}, indent=1))


if __name__ == "__main__":
    main()
