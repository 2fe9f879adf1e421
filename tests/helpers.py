"""Test helpers: run the real launchers in subprocesses on CPU, read their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str):  # noqa: ANN201 - the tool's module
    """`tools/<name>.py` as a module (tools/ is not a package), registered in sys.modules so its dataclasses
    resolve their annotations."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: CPU only, one thread per rank (2 ranks share 2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "MASTER_"))}
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: restarted workers must not reuse torchrun's rendezvous store,
    # or gloo reads the dead attempt's addresses and hangs (pytorch/pytorch#135712).
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)
    return env


def run_launcher(args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python launch/...` or `torchrun --nproc_per_node=N launch/...` from the repo root."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    p = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def stream(cmd: list[str], on_line, timeout: float = 240) -> tuple[int, str]:
    """Run `cmd`, calling `on_line(line, proc)` for each output line; kill it all after `timeout` seconds."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    fired: list[bool] = []

    def kill_all() -> None:  # torchrun starts its workers in sessions of their own: kill the whole tree
        fired.append(True)
        try:
            tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        except psutil.Error:
            return
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass

    watchdog = threading.Timer(timeout, kill_all)
    watchdog.start()
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            on_line(line, proc)
        rc = proc.wait()
    finally:
        watchdog.cancel()
    if fired:
        out.append(f"\n[killed by the test watchdog after {timeout}s]\n")
    return rc, "".join(out)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir: Path) -> dict:
    """Parameters of a run's newest checkpoint, unsharded, whatever strategy and world size wrote it."""
    from llm_dist.sample import load_model

    model, _, _ = load_model(str(run_dir))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
