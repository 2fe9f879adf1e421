"""The run-directory lock: one live run per out_dir, stale locks taken over, a second run refused in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_dist import run_lock
from llm_dist.run_lock import LOCK_NAME, RunLock, RunLockError
from tests.helpers import REPO, cpu_env, run_launcher


def _write_lock(d: Path, **info) -> Path:  # noqa: ANN003
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                                "job": None, **info}))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_acquire_release_and_a_second_holder_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    a = RunLock(tmp_path / "run")
    assert a.acquire() is None
    info = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    with pytest.raises(RunLockError, match=rf"out_dir {tmp_path}/run is in use by another run \(pid {os.getpid()} "
                                           rf"on {socket.gethostname()}, started .*delete {tmp_path}/run/{LOCK_NAME}"):
        RunLock(tmp_path / "run").acquire()
    a.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    b = RunLock(tmp_path / "run")
    assert b.acquire() is None
    b.release()


def test_stale_locks_are_taken_over(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cases = {
        "dead": ({"pid": _dead_pid()}, "is gone"),
        "same job": ({"pid": 1, "host": "elsewhere", "job": "4242"}, "this same job (4242)"),
        "no heartbeat": ({"pid": 1, "host": "elsewhere"}, "no heartbeat"),
    }
    for name, (info, reason) in cases.items():
        d = tmp_path / name.replace(" ", "_")
        path = _write_lock(d, **info)
        if name == "no heartbeat":
            old = time.time() - run_lock.STALE_S - 5
            os.utime(path, (old, old))
        lock = RunLock(d)
        note = lock.acquire()
        assert note is not None and reason in note, (name, note)
        assert json.loads(path.read_text())["pid"] == os.getpid()
        lock.release()


def test_a_live_holder_elsewhere_with_a_fresh_heartbeat_is_respected(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    _write_lock(tmp_path, pid=1, host="node7")  # pid 1 exists here too: the host decides, not the pid
    with pytest.raises(RunLockError, match="pid 1 on node7"):
        RunLock(tmp_path).acquire()


def test_heartbeat_refreshes_the_lock(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_NAME, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 5
    lock.release()


def test_a_second_run_on_a_busy_out_dir_is_refused_in_one_line(tmp_path: Path, prepared_byte_data: Path) -> None:
    """A live holder (another process on this host) keeps the directory; the launcher stops with exit 2 before
    touching anything. Once the holder is gone, its stale lock is taken over and the run goes through."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _write_lock(run, pid=holder.pid)
        before = sorted(p.name for p in run.iterdir())
        args = ["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
                f"out_dir={run}", "train.max_steps=2", "eval.sample_tokens=0", "eval.steps=1"]
        p = run_launcher(args, check=False)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}" in lines[0]
        assert sorted(q.name for q in run.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
    p = run_launcher(args, check=False)
    assert p.returncode == 0, p.stderr
    assert "took over the stale lock" in p.stderr and not (run / LOCK_NAME).exists()


def test_two_runs_started_together_one_wins(tmp_path: Path, prepared_byte_data: Path) -> None:
    run = tmp_path / "run"
    args = [sys.executable, "launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
            f"out_dir={run}", "train.max_steps=30", "eval.sample_tokens=0", "eval.steps=1", "checkpoint.interval=5"]
    procs = [subprocess.Popen(args, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-1500:] for r in results]
    loser = next(r for r in results if r[0] == 2)
    assert "is in use by another run" in loser[2] and "Traceback" not in loser[2]
    assert (run / "checkpoints" / "step_00000030" / "COMPLETE").exists()


def test_a_directory_the_lock_created_goes_again_when_left_empty(tmp_path: Path) -> None:
    """A run refused right after taking the lock (e.g. a bad resume path) must leave no empty out_dir behind;
    a directory the run wrote into stays."""
    lock = RunLock(tmp_path / "a" / "b")
    lock.acquire()
    lock.release()
    assert not (tmp_path / "a").exists()
    lock = RunLock(tmp_path / "c")
    lock.acquire()
    (tmp_path / "c" / "metrics.jsonl").write_text("{}\n")
    lock.release()
    assert (tmp_path / "c" / "metrics.jsonl").exists() and not (tmp_path / "c" / LOCK_NAME).exists()
