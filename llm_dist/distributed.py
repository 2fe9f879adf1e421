"""Distributed state: rank, world size, local rank, device and backend, in one place.

Reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and, when ranks are
started by `srun` directly, SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the master address from
SLURM_JOB_NODELIST). With neither, it is one process with no process group, so every module runs in a
plain test. NCCL on CUDA, gloo on CPU. `runtime(...)` is a context manager that always destroys the process
group on the way out, whether training finished, raised or was interrupted. Given the run's resolved
config, it first checks that every rank was started with the same one (`check_same_config`): nodes of a
multi-node job are started separately, and one started with other overrides would otherwise train silently
on another batch size or learning rate.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the job."""

    rank: int = 0  # global rank
    local_rank: int = 0  # rank within this node (picks the GPU)
    world_size: int = 1  # number of processes
    device: torch.device = torch.device("cpu")  # this rank's device
    backend: str = ""  # "nccl" | "gloo" | "" (no process group)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told us through the environment (before any process group exists)."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None
    master_port: str | None
    launcher: str  # "torchrun" | "slurm" | "none"
    local_world_size: int | None = None  # ranks on this node, when the launcher says (HSDP's default mesh)


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list, e.g. 'gpu[003-005,9],cpu1' -> 'gpu003' (as `scontrol show hostnames`)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding, like SLURM
    return prefix + first


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """torchrun's variables win; SLURM's are used when srun started every rank itself (SLURM_NTASKS > 1)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                         env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
        # A port derived from the job id, so two jobs sharing a node don't collide.
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        # Ranks on this node: --ntasks-per-node, else the first count of SLURM_TASKS_PER_NODE ("2(x2),1").
        per_node = env.get("SLURM_NTASKS_PER_NODE") or (re.match(r"\d+", env.get("SLURM_TASKS_PER_NODE", "")) or [None])[0]
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
                         env.get("MASTER_ADDR") or first_host(nodelist), port, "slurm",
                         int(per_node) if per_node else None)
    return LaunchEnv(0, 0, 1, None, None, "none")


def world_size_from_env() -> int:
    """World size the launcher asked for; used to validate the config before any process group exists."""
    return read_launch_env().world_size


def pick_device(preference: str, local_rank: int, key: str = "parallel.device") -> torch.device:
    """auto -> cuda:<local_rank> when CUDA is available, else cpu. A device this rank cannot use is a
    RuntimeError whose one line names `key` (the setting or flag that asked for it)."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{key}=cuda but CUDA is not available on this machine; use auto or cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"{key}=cuda: local rank {local_rank} has no GPU (this node has "
                           f"{torch.cuda.device_count()})")
    return torch.device("cuda", local_rank)


def watch_parent(poll_s: float = 1.0, env: dict[str, str] | None = None) -> bool:
    """Under torchrun, exit when the agent that started this worker dies. Returns whether it watches.

    A SIGKILLed torchrun agent cannot stop its workers: they are re-parented and would go on training (and
    writing checkpoints) with nobody to collect them (seen: 200 more steps). A daemon thread compares
    `os.getppid()` with the agent's pid once a second and, when it changes, exits the process at once
    (`os._exit`: no cleanup that could block on dead peers; any checkpoint being written stays an
    incomplete `.tmp` directory, which is never loaded). Plain `python` runs are not watched: a user may
    well start one with `nohup` and close the shell that was its parent.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env or getattr(watch_parent, "_started", False):
        return False
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"error: rank {env.get('RANK', '?')}: the torchrun agent (pid {parent}) is gone; exiting",
                      file=sys.stderr, flush=True)
                os._exit(70)  # EX_SOFTWARE; nobody is left to read it, but a wrapper may

    import threading

    threading.Thread(target=watch, name="llm_dist-parent-watch", daemon=True).start()
    watch_parent._started = True  # type: ignore[attr-defined]
    return True


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask under taskset / SLURM / containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_world_size(env: dict[str, str] | None = None) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else SLURM's tasks per node ("4" or "4(x2)"), else 1."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" in env:
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    m = re.match(r"\d+", env.get("SLURM_NTASKS_PER_NODE", "") or env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    return max(1, int(m.group())) if m and int(env.get("SLURM_NTASKS", "1")) > 1 else 1


def cpu_threads_for(requested: int, env: dict[str, str] | None = None, cores: int | None = None
                    ) -> tuple[int | None, str]:
    """(torch intra-op threads per rank, why) for a CPU run; None leaves torch's own setting.

    `requested` > 0 (parallel.cpu_threads) wins; then an OMP_NUM_THREADS the user exported (torch reads it
    itself); else the usable cores shared out between this node's ranks. torch's default is every core in
    every process, so two ranks (or a run next to another job) oversubscribe the cores: seen at 70x slower.
    """
    env = os.environ if env is None else env
    if requested > 0:
        return requested, "parallel.cpu_threads"
    if env.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    cores = usable_cores() if cores is None else cores
    ranks = local_world_size(env)
    return max(1, cores // ranks), f"auto: {cores} usable core(s) / {ranks} rank(s) on this node"


def set_cpu_threads(requested: int, rank: int) -> int:
    """Apply `cpu_threads_for` to this process; rank 0 says once what it chose. Returns the thread count."""
    n, why = cpu_threads_for(requested)
    if n is not None:
        torch.set_num_threads(n)
    if rank == 0:
        print(f"CPU threads per rank: {torch.get_num_threads()} ({why})", flush=True)
    return torch.get_num_threads()


def init_runtime(device: str = "auto", backend: str = "auto", timeout_s: int = 1800, cpu_threads: int = 0
                 ) -> Runtime:
    """Start the process group if the launcher asked for several ranks; otherwise a single process.

    On CPU the torch thread count is set first (`cpu_threads`: 0 = auto, see `cpu_threads_for`)."""
    env = read_launch_env()
    watch_parent()
    dev = pick_device(device, env.local_rank)
    if dev.type == "cpu":
        set_cpu_threads(cpu_threads, env.rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if env.world_size == 1:
        return Runtime(device=dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if env.launcher == "slurm":  # init_method=env:// reads these
        os.environ.setdefault("MASTER_ADDR", env.master_addr or "localhost")
        os.environ.setdefault("MASTER_PORT", env.master_port or "29500")
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        if env.local_world_size:  # as torchrun sets it: HSDP's default mesh is one replica per node
            os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1" and env.rank == 0):
        print("warning: torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted workers "
              "may hang in init_process_group (pytorch/pytorch#135712); export it before torchrun",
              file=sys.stderr, flush=True)
    kwargs = {"device_id": dev} if backend == "nccl" else {}  # binds NCCL's communicator eagerly to our GPU
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return Runtime(env.rank, env.local_rank, env.world_size, dev, backend)


def shutdown(clean: bool = True) -> None:
    """Destroy the process group if one exists (idempotent).

    `clean` (every rank is exiting normally): a last barrier, then a short pause without the GIL, so gloo's
    worker threads finish releasing the tensors of completed collectives first. ProcessGroupGloo's
    destructor joins those threads while holding the GIL, and one still releasing a tensor needs the GIL:
    a deadlock at exit, seen when DDP's reducer frees the group last (pytorch/pytorch#56297). On an error
    path no barrier is attempted (a dead peer would make it hang).
    """
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
            time.sleep(0.2)
        dist.destroy_process_group()


def flatten_config(config: Mapping[str, Any]) -> dict[str, str]:
    """Nested config dict -> {"train.batch_size": "8", ...} (values as JSON text, comparable across ranks)."""
    from llm_dist.config import flat_dict  # the config layer does not import this module: no cycle

    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flat_dict(config).items()}


def config_differences(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """Dotted keys whose values differ between two flattened configs (or that only one has), sorted."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_same_config(config: Mapping[str, Any]) -> None:
    """Refuse to train when the ranks were started with different resolved configs.

    Each node of a multi-node job parses its own command line; a node started with another override (say
    `train.batch_size`) would otherwise join the process group and train on another schedule. Every rank
    all-gathers a SHA-256 of its flattened config (a few bytes); only when they differ are the flattened
    configs gathered, to name the differing keys. Raises ConfigError (one line, exit 2) on every rank.
    """
    if get_world_size() == 1:
        return
    flat = flatten_config(config)
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
    digests: list[str | None] = [None] * get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    configs: list[dict[str, str] | None] = [None] * get_world_size()
    dist.all_gather_object(configs, flat)
    other = next(r for r, d in enumerate(digests) if d != digests[0])
    keys = config_differences(configs[0], configs[other])
    shown = ", ".join(f"{k}={configs[0].get(k, '(unset)')} on rank 0 but {configs[other].get(k, '(unset)')} on "
                      f"rank {other}" for k in keys[:3])
    more = f" (and {len(keys) - 3} more key(s))" if len(keys) > 3 else ""
    from llm_dist.config import (
        ConfigError,  # the config layer does not import this module: no cycle
    )

    raise ConfigError(f"the ranks were started with different configs: {shown}{more}; start every node with the "
                      "same config file and overrides")


@contextlib.contextmanager
def runtime(device: str = "auto", backend: str = "auto", cpu_threads: int = 0,
            config: Mapping[str, Any] | None = None) -> Iterator[Runtime]:
    """`with runtime() as rt:` — the process group is destroyed on every exit path. With `config` (the
    resolved config as a dict), every rank checks first that all ranks were started with the same one."""
    rt = init_runtime(device, backend, cpu_threads=cpu_threads)
    clean = False
    try:
        if config is not None:
            check_same_config(config)
        yield rt
        clean = True
    finally:
        shutdown(clean)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (logs from torchrun workers are otherwise held back)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def warn0(msg: str) -> None:
    if is_main():
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def agree_on_problem(problem: str | None) -> str | None:
    """Every rank passes what it found wrong (or None); every rank gets the first rank's problem, or None.

    For decisions that must be the same on every rank (is this checkpoint usable?) when each rank checked
    only its own part. A collective (object all-gather of a few short strings) when there are several ranks.
    """
    if get_world_size() == 1:
        return problem
    found: list[str | None] = [None] * get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p is not None), None)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process); returns t."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with one value."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed for dropout and sampling: distinct across ranks, a pure function of (seed, rank)."""
    return seed + 1_000_003 * rank
