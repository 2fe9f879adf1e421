"""Multi-node runs on one machine: the table of runs and the node-loss loss trace for docs/benchmarks.md.

    sudo bash tools/ci/cluster_up.sh 3
    python tools/bench_multinode.py --out runs/bench_multinode.json

On the network-namespace nodes of tools/ci/cluster_up.sh (CPU, gloo), the debug model with a global batch of
12: one process (the baseline), DDP, FSDP and HSDP on 2 nodes x 2 ranks, the HSDP checkpoint of step
`--steps / 2` resumed on 1 node x 2 ranks and on 3 nodes x 1 rank, and the node-loss run of
tests/multinode/test_elastic.py (`--nnodes=1:2`: node1 lost mid-checkpoint, then joining again). For each:
the largest parameter and loss difference from the one-process run, and the wall time. Then the node-loss
run's loss per step against the one-process run's, with the world size each step ran on. Prints tables and
writes JSON. Wall times are of torchrun end to end (start-up, rendezvous, training), on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import cluster_nodes as cn

from llm_dist.sample import load_model


def base_args(steps: int, data_dir: Path) -> list[str]:
    return ["launch/pretrain.py", "--config", "configs/debug.yaml", f"train.max_steps={steps}", "train.batch_size=12",
            "train.micro_batch_size=1", "train.log_interval=1", "eval.interval=0", "eval.sample_tokens=0",
            f"checkpoint.interval={steps // 2}", "checkpoint.keep_last_k=0", "model.bias=false",
            f"data.dir={data_dir}"]


def params(run: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(str(run))
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def compare(run: Path, ref: Path) -> tuple[float, float]:
    """(max |param difference|, max |loss difference| over the steps both logged)."""
    a, b = params(run), params(ref)
    dp = max((a[k] - b[k]).abs().max().item() for k in b)
    la, lb = cn.losses(run), cn.losses(ref)
    dl = max(abs(la[s] - lb[s]) for s in la if s in lb)
    return dp, dl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="steps of the 2-node runs (checkpoint at half)")
    ap.add_argument("--elastic-steps", type=int, default=20, help="steps of the node-loss run")
    ap.add_argument("--out", default="runs/bench_multinode.json", help="JSON output")
    a = ap.parse_args(argv)
    if a.steps < 2 or a.steps % 2:
        ap.error("--steps must be an even number >= 2")
    from llm_dist.data.prepare import ensure_prepared
    from llm_dist.tokenizer import ByteTokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_multinode_"))
    data = work / "data"
    ensure_prepared(data, str(REPO / "data/tinyshakespeare/input.txt"), ByteTokenizer(), 0.1, log=lambda *_: None)
    args = base_args(a.steps, data)
    rows: list[dict] = []

    def single(argv_: list[str], out: Path) -> float:
        t0 = time.monotonic()
        subprocess.run([sys.executable, *argv_, f"out_dir={out}"], cwd=REPO, env=cn.node_env(), check=True,
                       capture_output=True)
        return time.monotonic() - t0

    ref = work / "single"
    rows.append({"nodes": 1, "ranks": 1, "strategy": "single", "run": "one process (baseline)",
                 "wall_s": single(args, ref), "max_param_diff": 0.0, "max_loss_diff": 0.0})
    for strategy in ("ddp", "fsdp", "hsdp"):
        out = work / strategy
        t0 = time.monotonic()
        cn.run_on_nodes(2, 2, [*args, f"out_dir={out}", f"parallel.strategy={strategy}"], out / "logs")
        dp, dl = compare(out, ref)
        rows.append({"nodes": 2, "ranks": 4, "strategy": strategy, "run": "from scratch",
                     "wall_s": time.monotonic() - t0, "max_param_diff": dp, "max_loss_diff": dl})
    half = f"step_{a.steps // 2:08d}"
    for nnodes, nproc in ((1, 2), (3, 1)):
        out = work / f"resume{nnodes}x{nproc}"
        shutil.copytree(work / "hsdp" / "checkpoints" / half, out / "checkpoints" / half)
        t0 = time.monotonic()
        cn.run_on_nodes(nnodes, nproc, [*args, f"out_dir={out}", "parallel.strategy=hsdp"], out / "logs")
        dp, dl = compare(out, ref)
        rows.append({"nodes": nnodes, "ranks": nnodes * nproc, "strategy": "hsdp",
                     "run": f"resumed from the 2x2 HSDP checkpoint at step {a.steps // 2}",
                     "wall_s": time.monotonic() - t0, "max_param_diff": dp, "max_loss_diff": dl})

    # The node-loss run (micro-batch 2: 6 micro-batches per step alone, 3 with two nodes).
    eargs = [*base_args(a.elastic_steps, data), "train.micro_batch_size=2", "checkpoint.interval=2"]
    eref = work / "elastic_single"
    single(eargs, eref)
    eout = work / "elastic"
    port = cn.next_port()
    cmd = cn.torchrun_cmd("1:2", 1, port, [*eargs, f"out_dir={eout}"], f"bench{port}", max_restarts=3,
                          rdzv_conf=cn.ELASTIC_RDZV_CONF)
    ev = cn.lose_and_regain_node(cmd, eout, eout / "logs")
    if ev["rcs"] != [0, 0]:
        print(ev["log"][-3000:], file=sys.stderr)
        return 1
    dp, dl = compare(eout, eref)
    rows.append({"nodes": "2 -> 1 -> 2", "ranks": "2 -> 1 -> 2", "strategy": "ddp/single",
                 "run": f"node1 lost mid-save of {ev['saving'][0]}, resumed alone from step {ev['resumed_alone']}, "
                        f"joined again at step {ev['grown_at']}", "wall_s": ev["wall_s"],
                 "max_param_diff": dp, "max_loss_diff": dl})

    print("| nodes | ranks | strategy | run | max abs param diff vs 1 process | max abs loss diff | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['nodes']} | {r['ranks']} | {r['strategy']} | {r['run']} | {r['max_param_diff']:.2e} | "
              f"{r['max_loss_diff']:.2e} | {r['wall_s']:.1f} |")
    got, want = cn.losses(eout), cn.losses(eref)
    segments = ev["segments"]
    trace = []
    for step in sorted(want):
        world = [w for first, w in segments if step >= first][-1]
        trace.append({"step": step, "ranks": world, "loss": got[step], "reference": want[step],
                      "diff": got[step] - want[step]})
    print("\nnode-loss run: loss per step (the last record of a step trained twice) vs one process")
    print("| step | ranks | loss | one process | difference |")
    print("|---|---|---|---|---|")
    for t in trace:
        print(f"| {t['step']} | {t['ranks']} | {t['loss']:.6f} | {t['reference']:.6f} | {t['diff']:+.1e} |")
    result = {"machine": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "node_loss": {**{k: v for k, v in ev.items()
              if k not in ("log", "log1")}, "trace": trace}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {a.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
