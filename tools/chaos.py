"""Fault injection: kill ranks at random moments and check that training recovers to the same result.

    python tools/chaos.py --trials 10 --out runs/chaos.json
    python tools/chaos.py --trials 5 --strategy fsdp --async-save --kills 2

For each trial, a 2-rank `torchrun --max-restarts=K` run of the debug config is started, and at random
moments (a random training step, sometimes while a checkpoint is being written) a random worker gets
SIGKILL. torchrun restarts the group, which resumes from the newest complete checkpoint. A trial
*recovered* if the run finished and its final parameters are bit-identical to an uninterrupted reference
run of the same config. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm_dist.sample import load_model  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # restarts need a fresh store (pytorch#135712)
    return {k: v for k, v in env.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}


def _cmd(args: argparse.Namespace, out_dir: Path, restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            f"--max-restarts={restarts}", "launch/pretrain.py", "--config", "configs/debug.yaml", f"out_dir={out_dir}",
            f"train.max_steps={args.steps}", "train.batch_size=8", "train.micro_batch_size=2", "train.log_interval=1",
            "eval.interval=0", "eval.sample_tokens=0", f"checkpoint.interval={args.interval}", "model.dropout=0.1",
            f"parallel.strategy={args.strategy}", f"checkpoint.async_save={str(args.async_save).lower()}"]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(str(run_dir))
    return model.state_dict()


def _workers(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "launch/pretrain.py" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in sessions of their own)."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def run_trial(args: argparse.Namespace, out_dir: Path, rng: random.Random) -> dict:
    """One chaotic run: `args.kills` SIGKILLs at random steps, or while a checkpoint is being written."""
    plan = sorted(rng.sample(range(2, args.steps), args.kills))
    during_save = [rng.random() < 0.5 for _ in plan]  # kill at "checkpoint saved"-time instead of a step line
    proc = subprocess.Popen(_cmd(args, out_dir, args.kills + 1), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(args.timeout, lambda: _kill_tree(proc.pid))
    watchdog.start()
    done, events, log = 0, [], []
    t0 = time.time()
    for line in proc.stdout:
        log.append(line)
        if done >= len(plan):
            continue
        step = plan[done]
        # Step lines come after the step; a kill "during save" fires as soon as the next save starts writing
        # (the `.tmp` directory appears), i.e. somewhere inside the checkpoint write.
        hit = re.match(rf"step +{step}/\d+ \|", line) is not None  # `step  7/40 | loss ...`
        if hit and during_save[done]:
            deadline = time.time() + 5
            while time.time() < deadline and not list((out_dir / "checkpoints").glob("*.tmp")):
                time.sleep(0.005)
        if hit:
            workers = _workers(proc.pid)
            if workers:
                victim = rng.choice(workers)
                victim.send_signal(signal.SIGKILL)
                tmp = list((out_dir / "checkpoints").glob("*.tmp"))
                events.append({"after_step": step, "during_save": bool(tmp), "victim_pid": victim.pid})
            done += 1
    rc = proc.wait()
    watchdog.cancel()
    return {"plan": plan, "events": events, "rc": rc, "seconds": time.time() - t0,
            "resumes": "".join(log).count("resumed from"), "log_tail": "".join(log[-20:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--kills", type=int, default=1, help="SIGKILLs per trial")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--interval", type=int, default=4, help="checkpoint every N steps")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "hsdp"])
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a hung trial is killed")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="chaos_") as tmp:
        ref_dir = Path(tmp) / "reference"
        subprocess.run(_cmd(args, ref_dir, 0), cwd=REPO, env=_env(), check=True, capture_output=True)
        ref = _params(ref_dir)
        rows = []
        for i in range(args.trials):
            out = Path(tmp) / f"trial_{i}"
            r = run_trial(args, out, rng)
            equal = False
            if r["rc"] == 0:
                got = _params(out)
                equal = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
            r.update(trial=i, recovered=r["rc"] == 0 and equal, equal_params=equal)
            rows.append(r)
            kills = ", ".join(f"step {e['after_step']}{' (mid-save)' if e['during_save'] else ''}" for e in r["events"])
            print(f"trial {i}: kills after {kills or '-'}; exit {r['rc']}; resumed from a checkpoint {r['resumes']}x; "
                  f"final params {'equal' if equal else 'DIFFERENT'}; {r['seconds']:.0f}s", flush=True)
            if not r["recovered"]:
                print(r["log_tail"], flush=True)

    n_ok = sum(r["recovered"] for r in rows)
    mid = sum(e["during_save"] for r in rows for e in r["events"])
    print("\n| trials | kills | of them mid-checkpoint | recovered with equal parameters |")
    print("|---:|---:|---:|---:|")
    print(f"| {len(rows)} | {sum(len(r['events']) for r in rows)} | {mid} | {n_ok}/{len(rows)} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "trials": [{k: v for k, v in r.items() if k != "log_tail"}
                                                                             for r in rows], "recovered": n_ok}, indent=1))
        print(f"wrote {args.out}")
    return 0 if n_ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
