"""Start torchrun on the "nodes" of tools/ci/cluster_up.sh, as a user starts it on each host of a cluster.

Used by tests/multinode (through tests.helpers.load_tool) and tools/bench_multinode.py.

Each node's torchrun runs through tools/ci/on_node.sh (its network namespace, its hostname); the c10d
rendezvous store is on node0. Output goes to one log file per node; a node is "lost" by SIGKILLing every
process it started (its torchrun agent and the workers, which torchrun puts in sessions of their own).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
ON_NODE = REPO / "tools" / "ci" / "on_node.sh"
_ports = itertools.count(29400 + os.getpid() % 400)  # a fresh rendezvous port per job: no TIME_WAIT clash


# Elastic rendezvous: a restarted round closes 2 s after the first node joined (last_call_timeout) instead of
# 30 s; a node whose agent stopped sending keep-alives is dropped after 5 x 2 s (default 3 x 5 s). Not less: on
# a loaded machine a live agent's heartbeat can be late by seconds, and a live node taken for dead leaves a
# joining node to form a group of its own (seen with 2 x 1 s: two 1-node groups training side by side).
ELASTIC_RDZV_CONF = ("read_timeout=30,join_timeout=120,last_call_timeout=2,keep_alive_interval=2,"
                     "keep_alive_max_attempt=5")


def node_env() -> dict[str, str]:
    """The nodes' environment: CPU only, one thread per rank, this checkout importable, a fresh rendezvous
    store for restarted workers (pytorch/pytorch#135712), no launcher variables of an enclosing job."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "MASTER_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    return env


def next_port() -> int:
    return next(_ports)


@dataclass
class Node:
    """One node's torchrun (started by `start_node`)."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish in {timeout}s:\n{self.log()[-3000:]}") from None

    def kill(self) -> None:
        """SIGKILL every process this node started: the agent and its workers (a lost node)."""
        try:
            root = psutil.Process(self.proc.pid)
            tree = [*root.children(recursive=True), root]
        except psutil.Error:
            return
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()


def torchrun_cmd(nnodes: str, nproc: int, port: int, args: list[str], rdzv_id: str, max_restarts: int = 0,
                 rdzv_conf: str = "read_timeout=30,join_timeout=120") -> list[str]:
    """The command a user runs on every node (the README's), rendezvous on node0:port."""
    return [sys.executable, "-m", "llm_dist.torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=node0:{port}", f"--rdzv-id={rdzv_id}",
            f"--max-restarts={max_restarts}", f"--rdzv-conf={rdzv_conf}", "--monitor-interval=0.5", *args]


def start_node(name: str, cmd: list[str], log_dir: Path) -> Node:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    with open(log_path, "w") as f:
        proc = subprocess.Popen([str(ON_NODE), name, *cmd], cwd=REPO, env=node_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(name, proc, log_path)


def run_on_nodes(n: int, nproc: int, args: list[str], log_dir: Path, timeout: float = 300,
                 overrides: dict[int, list[str]] | None = None) -> list[Node]:
    """torchrun on node0..node<n-1> (n x nproc ranks) until all exit; asserts every node exited 0."""
    port = next_port()
    nodes = [start_node(f"node{i}", torchrun_cmd(str(n), nproc, port, [*args, *(overrides or {}).get(i, [])],
                                                 f"job{port}"), log_dir) for i in range(n)]
    try:
        codes = [node.wait(timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, rc in zip(nodes, codes):
        assert rc == 0, f"{node.name} exited {rc}:\n{node.log()[-3000:]}"
    return nodes


def wait_for(cond, timeout: float, what: str, nodes: list[Node]) -> None:
    """Poll `cond()` until true; on timeout kill the nodes and fail with their logs."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or all(n.proc.poll() is not None for n in nodes):
            logs = "\n".join(f"--- {n.name}\n{n.log()[-2000:]}" for n in nodes)
            for n in nodes:
                n.kill()
            raise AssertionError(f"never happened: {what}\n{logs}")
        time.sleep(0.1)


def losses(run: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; a step trained twice (after a resume) keeps its last record."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def worker_processes(node: Node) -> list[psutil.Process]:
    """The training processes torchrun started on `node` (they carry LOCAL_RANK; the agent does not)."""
    out = []
    for p in psutil.Process(node.proc.pid).children(recursive=True):
        try:
            if "LOCAL_RANK" in p.environ():
                out.append(p)
        except psutil.Error:
            pass
    return out


def sigterm_pending(pid: int) -> bool:
    """A SIGTERM was sent to (stopped) process `pid` and not yet delivered (/proc/PID/status pending masks)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    bit = 1 << (15 - 1)  # SIGTERM = 15; signal n is bit n-1 of the masks
    return any(int(line.split()[1], 16) & bit for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:")))


def lose_and_regain_node(cmd: list[str], out: Path, log_dir: Path, timeout: float = 120) -> dict:
    """The node-loss scenario: `cmd` (an elastic `--nnodes=1:2 --max-restarts=K` torchrun writing to `out`)
    on node0 and node1; node1 is lost (SIGKILL of all it started) while a checkpoint after step 2 is being
    written; node0 resumes alone; node1 starts again and joins (1 -> 2); both finish.

    Returns: saving (the `.tmp` checkpoint(s) being written when node1 died), resumed_alone and grown_at (the
    steps node0 resumed from with 1 and then 2 nodes), rcs (both exit codes), log/log1 (node0's and the new
    node1's output), wall_s, and segments [(first step, world size)] of the training.
    """
    ckpts = out / "checkpoints"
    t0 = time.monotonic()
    node0, node1 = start_node("node0", cmd, log_dir), start_node("node1", cmd, log_dir)
    nodes = [node0, node1]
    try:
        wait_for(lambda: "2 rank(s) on cpu" in node0.log(), timeout, "a 2-node group", nodes)
        wait_for(lambda: any(s >= 3 for s in losses(out)) and any(ckpts.glob("*.tmp")), timeout,
                 "a checkpoint being written after step 3", nodes)
        saving = sorted(p.name for p in ckpts.glob("*.tmp"))
        node1.kill()
        lost_at = max(losses(out))
        wait_for(lambda: "now 1)" in node0.log(), timeout, "node0 resuming alone", nodes)
        resumed_alone = int(re.findall(r"at step (\d+)", node0.log())[-1])
        # A node joins: torchrun started again on node1. A step takes ~0.1 s here and a torchrun start several
        # seconds, so node0's worker is held (SIGSTOP) until its agent has seen node1 waiting and asked it to
        # stop (SIGTERM pending): the regrouping then always lands mid-run, never after the last step.
        mark = len(node0.log())
        workers = worker_processes(node0)
        for w in workers:
            w.suspend()
        try:
            node1 = start_node("node1", cmd, log_dir)
            nodes = [node0, node1]
            wait_for(lambda: all(sigterm_pending(w.pid) for w in workers), timeout,
                     "node0's agent to see node1 waiting", nodes)
        finally:
            for w in workers:
                w.resume()
        wait_for(lambda: "now 2)" in node0.log()[mark:], timeout, "the group growing back to 2", nodes)
        grown_at = int(re.findall(r"at step (\d+)", node0.log())[-1])
        rcs = [node0.wait(2 * timeout), node1.wait(2 * timeout)]
    finally:
        for n in nodes:
            n.kill()
    return {"saving": saving, "lost_at": lost_at, "resumed_alone": resumed_alone, "grown_at": grown_at, "rcs": rcs,
            "log": node0.log(), "log1": node1.log(), "wall_s": time.monotonic() - t0,
            "segments": [(1, 2), (resumed_alone + 1, 1), (grown_at + 1, 2)]}
