"""Losing a node and gaining one, for real: `torchrun --nnodes=1:2 --max-restarts=3` on node0 and node1.

node1 is lost (every process it started SIGKILLed) while a checkpoint is being written; node0's torchrun
restarts its worker, which resumes alone (world size 2 -> 1) from the newest *complete* checkpoint. Then node1
is started again: node0's agent sees a node waiting, stops its worker (SIGTERM: it saves and exits) and the two
continue together (1 -> 2). The global batch never changes, so every step sees the same samples whatever the
world size: the loss of every step equals the uninterrupted single-process run's, as an uninterrupted run that
changed world size at those steps would (tests/multinode/test_torchrun.py: any world size gives the
single-process numbers within 1e-5).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cpu_env, final_params, load_tool

cn = load_tool("cluster_nodes")  # tools/cluster_nodes.py: torchrun on the namespace nodes


STEPS = 20
ARGS = ["launch/pretrain.py", "--config", "configs/debug.yaml", f"train.max_steps={STEPS}", "train.batch_size=12",
        "train.micro_batch_size=2", "train.log_interval=1", "eval.interval=0", "eval.sample_tokens=0",
        "checkpoint.interval=2", "checkpoint.keep_last_k=0", "model.bias=false"]
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(prepared_byte_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    p = subprocess.run([sys.executable, *ARGS, f"data.dir={prepared_byte_data}", f"out_dir={out}"], cwd=REPO,
                       env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def elastic_run(cluster, prepared_byte_data: Path, tmp_path_factory) -> dict:
    """The node-loss / node-join run; returns what happened, for the tests below."""
    out = tmp_path_factory.mktemp("elastic")
    port = cn.next_port()
    cmd = cn.torchrun_cmd("1:2", 1, port, [*ARGS, f"data.dir={prepared_byte_data}", f"out_dir={out}"], f"job{port}",
                          max_restarts=3, rdzv_conf=cn.ELASTIC_RDZV_CONF)
    return {"out": out, **cn.lose_and_regain_node(cmd, out, out / "logs")}


def test_lost_node_resumes_alone_from_the_newest_complete_checkpoint(elastic_run):
    r = elastic_run
    assert r["rcs"] == [0, 0], (r["log"][-3000:], r["log1"][-3000:])
    assert r["saving"], "node1 was not lost mid-checkpoint"
    saving_step = int(r["saving"][0].split("_")[1].split(".")[0])
    # The checkpoint node1 died in stayed incomplete (`.tmp`, never loaded): node0 resumed from the one before.
    assert r["resumed_alone"] == saving_step - 2, (r["saving"], r["resumed_alone"])
    assert f"{r['saving'][0]} is incomplete" in r["log"] or "checkpoint write failed" in r["log"], r["log"][-3000:]
    assert "written by 2 rank(s), now 1" in r["log"], r["log"][-3000:]
    # node1 joined mid-run: node0's worker, stopped by its agent (SIGTERM), saved; both resumed from that step.
    assert "written by 1 rank(s), now 2" in r["log"], r["log"][-3000:]
    assert r["resumed_alone"] < r["grown_at"] < STEPS, (r["resumed_alone"], r["grown_at"])
    assert (r["out"] / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()


def test_losses_equal_the_uninterrupted_run(elastic_run, reference):
    got, ref = cn.losses(elastic_run["out"]), cn.losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= TOL, (step, got[step], ref[step])
    pa, pb = final_params(elastic_run["out"]), final_params(reference)
    assert max((pa[k].double() - pb[k].double()).abs().max().item() for k in pa) <= TOL
