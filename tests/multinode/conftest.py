"""Fixtures for the multi-node tests: the cluster of network namespaces made by tools/ci/cluster_up.sh.

Without LLM_DIST_CLUSTER=1 these tests are skipped; with it (CI sets it after `bash tools/ci/cluster_up.sh 3`),
a cluster that is missing or does not answer is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import load_tool

cn = load_tool("cluster_nodes")  # tools/cluster_nodes.py: torchrun on the namespace nodes


NODES_NEEDED = 3  # resume on 3 nodes; the SLURM cluster uses the first 2


@pytest.fixture(scope="session")
def cluster() -> int:
    """The number of nodes that answer (node0 .. node<n-1>); skips without LLM_DIST_CLUSTER=1."""
    if os.environ.get("LLM_DIST_CLUSTER") != "1":
        pytest.skip("no cluster: set LLM_DIST_CLUSTER=1 after `bash tools/ci/cluster_up.sh 3` as root (CI does)")
    # Every node runs a command under its own hostname and reaches node0 (a refused connection proves a route).
    probe = ("import socket,sys\ntry: socket.create_connection(('node0', 9), timeout=5).close()\n"
             "except ConnectionRefusedError: pass\nprint(socket.gethostname())")
    for i in range(NODES_NEEDED):
        try:
            p = subprocess.run([str(cn.ON_NODE), f"node{i}", "python3", "-c", probe], capture_output=True, text=True,
                               timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.fail(f"LLM_DIST_CLUSTER=1 but node{i} does not answer: {e}")
        if p.returncode != 0 or p.stdout.strip() != f"node{i}":
            pytest.fail(f"LLM_DIST_CLUSTER=1 but node{i} is not usable (run `bash tools/ci/cluster_up.sh "
                        f"{NODES_NEEDED}` as root): {p.stdout.strip()!r} {p.stderr.strip()[-500:]!r}")
    return NODES_NEEDED
