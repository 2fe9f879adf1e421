"""Start torchrun on the "nodes" of tools/ci/cluster_up.sh, as a user starts it on each host of a cluster.

Each node's torchrun runs through tools/ci/on_node.sh (its network namespace, its hostname); the c10d
rendezvous store is on node0. Output goes to one log file per node; a node is "lost" by SIGKILLing every
process it started (its torchrun agent and the workers, which torchrun puts in sessions of their own).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers import REPO, cpu_env

ON_NODE = REPO / "tools" / "ci" / "on_node.sh"
_ports = itertools.count(29400 + os.getpid() % 400)  # a fresh rendezvous port per job: no TIME_WAIT clash


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
        proc = subprocess.Popen([str(ON_NODE), name, *cmd], cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO)),
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


def wait_for(cond, timeout: float, what: str, nodes: list[Node]) -> None:  # noqa: ANN001 - a predicate
    """Poll `cond()` until true; on timeout kill the nodes and fail with their logs."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or all(n.proc.poll() is not None for n in nodes):
            logs = "\n".join(f"--- {n.name}\n{n.log()[-2000:]}" for n in nodes)
            for n in nodes:
                n.kill()
            raise AssertionError(f"never happened: {what}\n{logs}")
        time.sleep(0.1)
