"""StepProfiler: the configured step window is traced, a trace file appears, the top-kernels table is printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_dist.config import ProfileConfig
from llm_dist.train.profiler import StepProfiler


def fake_steps(prof: StepProfiler, n: int) -> None:
    a = torch.randn(64, 64)
    for _ in range(n):
        (a @ a).relu().sum()
        prof.step()


@pytest.mark.parametrize("trace", ["tensorboard", "chrome"])
def test_window_writes_a_trace_and_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture, trace: str) -> None:
    cfg = ProfileConfig(enabled=True, wait=1, warmup=1, active=2, trace=trace, row_limit=5)
    with StepProfiler(cfg, tmp_path, torch.device("cpu")) as prof:
        fake_steps(prof, 6)
    assert prof.trace_files, list((tmp_path / "profile").iterdir())
    trace_file = prof.trace_files[0]
    events = json.loads(trace_file.read_text())["traceEvents"]
    # Exactly the active steps are in the trace: the profiler labels each recorded step ProfilerStep#<n>.
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    out = capsys.readouterr().out
    assert "profile of steps 3-4 (sorted by self_cpu_time_total)" in out
    assert "aten::mm" in out and "Self CPU time total" in out


def test_disabled_does_nothing(tmp_path: Path) -> None:
    with StepProfiler(ProfileConfig(), tmp_path, torch.device("cpu")) as prof:
        fake_steps(prof, 3)
    assert not (tmp_path / "profile").exists() and prof.table is None


def test_run_shorter_than_the_window_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = ProfileConfig(enabled=True, wait=5, warmup=1, active=2)
    with StepProfiler(cfg, tmp_path, torch.device("cpu")) as prof:
        fake_steps(prof, 3)
    assert prof.table is None
    assert "before the profile window (profile.wait + warmup + active = 8 steps) closed" in capsys.readouterr().err
