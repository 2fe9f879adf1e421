"""MetricsLogger: JSONL always, samples as text records, a failing backend warns once and never stops logging."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from llm_dist.config import LoggingConfig
from llm_dist.train.logger import MetricsLogger


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fake_wandb(monkeypatch: pytest.MonkeyPatch, fail_init: bool = False, fail_log_after: int = -1) -> dict:
    """A stand-in `wandb` module that records calls (the real one is an optional extra)."""
    calls: dict = {"init": [], "log": [], "finish": 0}

    class Run:
        def log(self, data: dict, step: int) -> None:
            if 0 <= fail_log_after <= len(calls["log"]):
                raise ConnectionError("wandb backend unreachable")
            calls["log"].append((step, data))

        def finish(self) -> None:
            calls["finish"] += 1

    def init(**kwargs) -> Run:
        if fail_init:
            raise RuntimeError("no API key")
        calls["init"].append(kwargs)
        return Run()

    mod = types.SimpleNamespace(init=init, Html=lambda s: ("html", s))
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return calls


def test_jsonl_console_and_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = MetricsLogger(tmp_path, LoggingConfig())
    log.log(1, {"loss": 2.5, "lr": 1e-3})
    log.log(2, {"val/loss": 2.0}, prefix="eval  ")
    log.text(2, "sample", "ROMEO:\nhello")
    log.close()
    recs = records(tmp_path / "metrics.jsonl")
    assert [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for r in recs] == [
        (1, {"loss": 2.5, "lr": 1e-3}), (2, {"val/loss": 2.0}), (2, {"sample": "ROMEO:\nhello"})]
    out = capsys.readouterr().out
    assert "step      1 | loss 2.5000 | lr 1.00e-03" in out and "eval  step      2 | val/loss 2.0000" in out


def test_disabled_rank_writes_nothing(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path / "r1", LoggingConfig(wandb="offline", tensorboard=True), enabled=False)
    log.log(1, {"loss": 1.0})
    log.text(1, "sample", "x")
    log.close()
    assert not (tmp_path / "r1").exists()


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_wandb_mode_and_payloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    calls = fake_wandb(monkeypatch)
    log = MetricsLogger(tmp_path / "run", LoggingConfig(wandb=mode, wandb_project="p"), run_config={"a": 1})
    log.log(3, {"loss": 1.5, "skipped": True, "note": "x"})
    log.text(3, "sample", "a<b")
    log.close()
    assert calls["init"] == [dict(project="p", mode=mode, dir=str(tmp_path / "run"), config={"a": 1}, name="run")]
    assert calls["log"] == [(3, {"loss": 1.5}), (3, {"sample": ("html", "<pre>a&lt;b</pre>")})]
    assert calls["finish"] == 1


def test_wandb_init_failure_warns_once_and_training_logs_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    fake_wandb(monkeypatch, fail_init=True)
    log = MetricsLogger(tmp_path, LoggingConfig(wandb="online"))
    for step in range(3):
        log.log(step, {"loss": 1.0})
    log.close()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "wandb disabled: RuntimeError: no API key" in err
    assert len(records(tmp_path / "metrics.jsonl")) == 3


def test_backend_failing_mid_run_warns_once_and_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    calls = fake_wandb(monkeypatch, fail_log_after=2)
    log = MetricsLogger(tmp_path, LoggingConfig(wandb="offline"))
    for step in range(6):
        log.log(step, {"loss": float(step)})
    log.text(6, "sample", "still written")
    log.close()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "wandb logging failed, disabled for the rest of the run: ConnectionError" in err
    assert [s for s, _ in calls["log"]] == [0, 1]  # dropped after the failure, not retried every step
    assert len(records(tmp_path / "metrics.jsonl")) == 7  # JSONL unaffected


def test_tensorboard_writes_events_or_warns_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    try:
        import tensorboard  # noqa: F401
        have_tb = True
    except ImportError:
        have_tb = False
    log = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True))
    log.log(1, {"loss": 1.0})
    log.text(1, "sample", "text")
    log.close()
    err = capsys.readouterr().err
    if have_tb:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*")) and "warning" not in err
    else:
        assert err.count("warning:") == 1 and "TensorBoard disabled" in err
    assert len(records(tmp_path / "metrics.jsonl")) == 2


def test_jsonl_failure_does_not_stop_the_other_sinks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = MetricsLogger(tmp_path, LoggingConfig())
    jsonl = next(s for s in log.sinks if s.name == "JSONL")
    jsonl._f.close()  # as if the disk went away: writes now raise ValueError
    log.log(1, {"loss": 1.0})
    log.log(2, {"loss": 0.5})
    log.close()
    cap = capsys.readouterr()
    assert cap.err.count("warning:") == 1 and "JSONL logging failed" in cap.err
    assert "step      2 | loss 0.5000" in cap.out


def test_console_mfu_percent_and_time_units_jsonl_raw(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The console says `mfu 30.7%` and `step_time 34.5 ms`; JSONL keeps the raw fraction and seconds."""
    log = MetricsLogger(tmp_path, LoggingConfig())
    rec = {"loss": 3.25, "step_time": 0.0345, "tok_per_s": 354861.0, "mfu": 0.3071, "mem_gib": 4.5}
    log.log(10, rec)
    log.log(20, {"step_time": 2.5, "mfu": 8.770e-04, "time_generate": 0.25})
    log.close()
    out = capsys.readouterr().out
    assert ("step     10 | loss 3.2500 | step_time 34.5 ms | tok_per_s 354,861 | mfu 30.7% | mem_gib 4.5000"
            in out), out
    assert "step     20 | step_time 2.50 s | mfu 0.088% | time_generate 250.0 ms" in out, out
    assert "e-04" not in out
    recs = records(tmp_path / "metrics.jsonl")
    assert {k: recs[0][k] for k in rec} == rec
    assert recs[1]["mfu"] == 8.770e-04 and recs[1]["step_time"] == 2.5
