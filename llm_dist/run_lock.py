"""One run per run directory: a lock file naming its holder, with stale locks detected.

Two runs writing one `out_dir` interleave their checkpoints and prune each other's (seen: a
`FileNotFoundError ... .metadata.tmp` from two runs racing on one step). Rank 0 of a run therefore creates
`<out_dir>/.lock` exclusively (`O_CREAT | O_EXCL`, which shared filesystems honour, unlike `flock` on some
NFS setups) holding its host, pid, start time and job id, refreshes its mtime every `HEARTBEAT_S` seconds
from a daemon thread, and removes it when the run ends. A second run finds the file and stops with one
line naming the holder, unless the lock is stale:

- its holder is on this host and its pid is gone (a killed run), or
- it was taken by this same job (SLURM_JOB_ID / torchrun's run id: a requeued or restarted incarnation of
  this very run, possibly on another node), or
- its heartbeat is older than `STALE_S` (a holder on another host that died without cleaning up).

A stale lock is moved aside atomically (`os.rename`, which only one contender can win) and taken over.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: a holder that alive would have refreshed it


class RunLockError(RuntimeError):
    """The run directory is in use by another live run (one line naming it)."""


def _job_id() -> str | None:
    """An id shared by every incarnation of one job: SLURM's job id, else torchrun's rendezvous run id."""
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale_reason(info: dict | None, mtime: float, now: float) -> str | None:
    """Why the lock described by `info` (None: unreadable) no longer protects a live run, else None."""
    if now - mtime > STALE_S:
        return f"no heartbeat for {now - mtime:.0f}s"
    if info is None:
        return None  # unreadable but fresh: a holder may be writing it right now
    job = _job_id()
    if job is not None and info.get("job") == job:
        return f"taken by this same job ({job}) before a restart"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        return f"its process {info['pid']} on this host is gone"
    return None


class RunLock:
    """The lock on one run directory; `acquire()` on rank 0 only, `release()` at the end (idempotent)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self._created: list[Path] = []

    def _info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "job": _job_id(),
                "argv": sys.argv[:8]}

    def _read(self) -> tuple[dict | None, float]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None, -1.0
        try:
            info = json.loads(self.path.read_text())
            return (info if isinstance(info, dict) else None), mtime
        except (OSError, ValueError):
            return None, mtime

    def acquire(self) -> str | None:
        """Take the lock or raise RunLockError. Returns a note when a stale lock was taken over."""
        created = [p for p in [self.dir, *self.dir.parents] if not p.exists()]  # innermost first
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._created = created  # removed again at release if the run left them empty (it stopped early)
        except OSError as e:
            raise RunLockError(f"out_dir {self.dir}: cannot create it ({e.strerror or e})") from None
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info, mtime = self._read()
                if mtime < 0:
                    continue  # released between our two calls: try again
                reason = _stale_reason(info, mtime, time.time())
                if reason is None:
                    who = (f"pid {info.get('pid')} on {info.get('host')}, started "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('started', mtime)))}"
                           if info else "a run whose lock is being written")
                    raise RunLockError(f"out_dir {self.dir} is in use by another run ({who}); wait for it, use "
                                       f"another out_dir, or delete {self.path} if that run is gone") from None
                aside = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
                try:
                    os.rename(self.path, aside)  # only one contender's rename of this file succeeds
                    aside.unlink()
                except FileNotFoundError:
                    pass
                note = f"took over the stale lock {self.path} ({reason})"
                continue
            except OSError as e:
                raise RunLockError(f"out_dir {self.dir}: cannot write its lock file ({e.strerror or e})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._info(), f)
                f.flush()
                os.fsync(f.fileno())
            self._held = True
            _HELD.append(self)
            self._thread = threading.Thread(target=self._heartbeat, name="llm_dist-run-lock", daemon=True)
            self._thread.start()
            return note
        raise RunLockError(f"out_dir {self.dir}: could not take {self.path} (another run keeps taking it)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the directory vanished or the disk is gone: the run itself will say so

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        if not self._held:
            return
        self._held = False
        if self in _HELD:
            _HELD.remove(self)
        self._stop.set()
        info, _ = self._read()
        if info is not None and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        for d in self._created:  # a run refused before writing anything leaves no empty out_dir behind
            try:
                d.rmdir()
            except OSError:
                break  # not empty (the run wrote something) or not ours to remove


_HELD: list[RunLock] = []


def release_all() -> None:
    """Release every lock this process holds: the end of a stage, whatever way it ends (cli.run's `finally`,
    and at interpreter exit for anything else)."""
    for lock in list(_HELD):
        lock.release()


atexit.register(release_all)
