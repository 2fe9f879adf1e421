"""Faults on CPU: a rank SIGKILLed under `torchrun --max-restarts` resumes to the uninterrupted result;
SIGTERM (a scheduler's preemption notice) saves and exits with the requeue code."""

from __future__ import annotations

import random
import re
import signal
import sys
from pathlib import Path

import psutil
import pytest
import torch

from llm_dist.checkpoint import find_latest, read_json
from llm_dist.pretrain import EXIT_REQUEUE
from tests.helpers import final_params, read_metrics, run_launcher, stream

ARGS = ["launch/pretrain.py", "--config", "configs/debug.yaml", "train.max_steps=16", "train.batch_size=8",
        "train.micro_batch_size=2", "train.log_interval=1", "eval.interval=0", "eval.steps=2",
        "eval.sample_tokens=0", "checkpoint.interval=4", "model.dropout=0.1"]


def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    return [p for p in launcher.children(recursive=True) if "launch/pretrain.py" in " ".join(p.cmdline())]


def test_sigkill_of_a_rank_restarts_and_finishes_equal(tmp_path: Path, prepared_byte_data: Path) -> None:
    args = [*ARGS, f"data.dir={prepared_byte_data}"]
    run_launcher([*args, f"out_dir={tmp_path / 'ref'}"], nproc=2)

    rng = random.Random(0)
    kill_at, victim = rng.randint(5, 13), rng.randint(0, 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
           *args, f"out_dir={tmp_path / 'chaos'}"]
    killed = []

    def on_line(line: str, proc) -> None:  # noqa: ANN001
        if not killed and re.match(rf"step +{kill_at}/\d+ \|", line):
            workers = sorted(_workers(psutil.Process(proc.pid)), key=lambda p: p.create_time())
            workers[victim % len(workers)].send_signal(signal.SIGKILL)
            killed.append(kill_at)

    rc, log = stream(cmd, on_line)
    assert rc == 0, log[-3000:]
    assert killed and "resumed from" in log, log[-3000:]

    ref, chaos = final_params(tmp_path / "ref"), final_params(tmp_path / "chaos")
    assert all(torch.equal(ref[k], chaos[k]) for k in ref), "restarted run diverged from the uninterrupted one"
    steps = [r["step"] for r in read_metrics(tmp_path / "chaos") if "loss" in r]
    assert steps[-1] == 16 and len(steps) > 16  # the steps after the last checkpoint were run twice


def test_sigterm_saves_and_exits_with_the_requeue_code(tmp_path: Path, prepared_byte_data: Path) -> None:
    def on_line(line: str, proc) -> None:  # noqa: ANN001
        if re.match(r"step +3/\d+ \|", line):
            proc.send_signal(signal.SIGTERM)

    rc, log = stream([sys.executable, *ARGS, f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}",
                      "train.max_steps=1000"], on_line, timeout=120)
    assert rc == EXIT_REQUEUE, log[-3000:]
    assert "received SIGTERM" in log
    latest = find_latest(str(tmp_path / "checkpoints"))
    assert latest is not None and 3 <= read_json(latest, "meta.json")["step"] < 1000


@pytest.mark.parametrize("mode", ["halt", "skip"])
def test_nonfinite_loss_halts_keeping_the_last_good_checkpoint(tmp_path: Path, prepared_byte_data: Path,
                                                               mode: str) -> None:
    # lr = 1e4 blows the weights up within a few steps: NaN loss. halt stops at once, skip after k in a row.
    p = run_launcher([*ARGS, f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}", "optim.lr=1e4",
                      "optim.warmup_steps=0", "train.grad_clip=0", "checkpoint.interval=1", f"train.nonfinite={mode}",
                      "train.max_skipped_steps=2", "train.detect_anomaly=false"], check=False)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "loss is nan" in p.stdout + p.stderr or "loss is inf" in p.stdout + p.stderr
    latest = find_latest(str(tmp_path / "checkpoints"))
    assert latest is not None
    bad_step = read_json(latest, "meta.json")["step"] + 1  # checkpoints stop before the first bad step
    assert f"step {bad_step}: loss is" in p.stdout + p.stderr
