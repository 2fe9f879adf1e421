"""Stop a run (SIGINT), resume it, and get bit-identical losses and parameters to an uninterrupted run."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import torch

from llm_dist.checkpoint import find_latest, read_json
from tests.helpers import final_params, read_metrics, run_launcher, stream


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_stop_and_resume_is_bit_exact(tmp_path: Path, prepared_byte_data: Path) -> None:
    args = ["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
            "model.dropout=0.1",  # dropout makes the RNG state part of what must resume exactly
            "train.max_steps=14", "train.log_interval=1", "eval.interval=0", "eval.steps=2",
            "eval.sample_tokens=16", "checkpoint.interval=0"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run_launcher([*args, f"out_dir={full}"])

    # Interrupt the second run like a user pressing Ctrl-C once training is under way.
    def on_line(line: str, proc) -> None:  # noqa: ANN001
        if re.match(r"step +3/\d+ \|", line):
            proc.send_signal(signal.SIGINT)

    rc, log = stream([sys.executable, *args, f"out_dir={stopped}"], on_line, timeout=120)
    assert rc == 0, log
    assert "received SIGINT" in log and "training stopped at step" in log
    stop_step = find_latest(str(stopped / "checkpoints"))
    k = read_json(stop_step, "meta.json")["step"]
    assert 3 <= k < 14, log

    resumed = run_launcher([*args, f"out_dir={stopped}"])  # checkpoint.resume=auto by default
    assert f"resumed from {stop_step} at step {k}" in resumed.stdout

    a, b = _losses(full), _losses(stopped)
    assert sorted(b) == list(range(1, 15))
    assert [b[s] for s in range(1, 15)] == [a[s] for s in range(1, 15)]  # exact float equality
    pa, pb = final_params(full), final_params(stopped)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)

    # The finished run samples from its final checkpoint with the generation CLI.
    gen = run_launcher(["launch/generate.py", "--checkpoint", str(stopped), "--prompt", "ROMEO:",
                        "--max-new-tokens", "20", "--num-samples", "2"])
    assert gen.stdout.count("---- sample") == 2 and "ROMEO:" in gen.stdout
