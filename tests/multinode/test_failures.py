"""Failure modes a user meets on a first multi-node job: a node that cannot reach the rendezvous endpoint
fails within its stated timeout with one line naming the endpoint; nodes started with different configs are
refused at start-up, naming the differing key.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import load_tool

cn = load_tool("cluster_nodes")  # tools/cluster_nodes.py: torchrun on the namespace nodes


READ_TIMEOUT_S = 5
ARGS = ["launch/pretrain.py", "--config", "configs/debug.yaml", "train.max_steps=2", "train.batch_size=8",
        "train.micro_batch_size=2", "eval.interval=0", "eval.sample_tokens=0"]


@pytest.mark.parametrize("endpoint", ["node0:{port}", "node7:{port}"], ids=["wrong-port", "unknown-host"])
def test_unreachable_rendezvous_is_one_line_within_the_timeout(cluster, tmp_path: Path, endpoint: str):
    """node1 alone, pointed at a port nobody listens on (node0 runs nothing there) or at a host that does not
    exist: torchrun gives up after read_timeout; the last line names the endpoint and the timeout."""
    port = cn.next_port()
    endpoint = endpoint.format(port=port)
    cmd = cn.torchrun_cmd("2", 1, port, ["launch/pretrain.py"], "unreachable", rdzv_conf=f"read_timeout={READ_TIMEOUT_S}")
    cmd = [c.replace(f"node0:{port}", endpoint) for c in cmd]
    t0 = time.monotonic()
    node = cn.start_node("node1", cmd, tmp_path)
    rc = node.wait(READ_TIMEOUT_S * 3 + 30)  # the connect timeout, twice at most, plus torch's import
    took = time.monotonic() - t0
    last = node.log().strip().splitlines()[-1]
    assert rc == 2, node.log()[-3000:]
    assert last == (f"error: node1: cannot reach the rendezvous endpoint {endpoint} within "
                    f"read_timeout={READ_TIMEOUT_S}s ({last.split('s (', 1)[1]}"), last
    assert f"({endpoint.replace(':', ', ')})" in last or "resolve" in last, last  # torch's own reason, one line
    assert took < READ_TIMEOUT_S * 3 + 30


def test_nodes_with_different_configs_are_refused(cluster, prepared_byte_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = [*ARGS, f"data.dir={prepared_byte_data}", f"out_dir={out}"]
    with pytest.raises(AssertionError) as failed:
        cn.run_on_nodes(2, 1, args, tmp_path / "logs", timeout=180, overrides={1: ["train.batch_size=4"]})
    report = str(failed.value)
    # Every rank refuses; each node's log has the one line.
    logs = {p.name.split("-")[0]: p.read_text() for p in (tmp_path / "logs").iterdir()}
    want = ("error: the ranks were started with different configs: train.batch_size=8 on rank 0 but 4 on rank 1; "
            "start every node with the same config file and overrides")
    assert all(want in log for log in logs.values()), report
    assert "step " not in logs["node0"]  # nothing trained
    assert not (out / "checkpoints").exists()
