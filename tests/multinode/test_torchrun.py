"""torchrun across real hosts (network namespaces, gloo over the subnet): DDP, FSDP and HSDP on 2 nodes x 2
ranks end with the parameters of one process on the same global batch; the HSDP checkpoint resumes on 1 node
and on 3 nodes with the losses of the uninterrupted run (the same global data order).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, cpu_env, final_params, load_tool, read_metrics

cn = load_tool("cluster_nodes")  # tools/cluster_nodes.py: torchrun on the namespace nodes


# Global batch 12 = 1 micro-batch of 1 x 12 ranks... : divisible by 1, 2, 3 and 4 ranks (gradient accumulation
# makes up the rest), so every world size sees the same samples per step.
STEPS = 4
ARGS = ["launch/pretrain.py", "--config", "configs/debug.yaml", f"train.max_steps={STEPS}", "train.batch_size=12",
        "train.micro_batch_size=1", "train.log_interval=1", "eval.interval=0", "eval.sample_tokens=0",
        "checkpoint.interval=2", "checkpoint.keep_last_k=0", "model.bias=false"]
TOL = 1e-5


def losses(run: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def max_param_diff(a: Path, b: Path) -> float:
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    return max((pa[k].double() - pb[k].double()).abs().max().item() for k in pa)


@pytest.fixture(scope="module")
def data_args(prepared_byte_data: Path) -> list[str]:
    return [*ARGS, f"data.dir={prepared_byte_data}"]


@pytest.fixture(scope="module")
def reference(data_args, tmp_path_factory) -> Path:
    """One process, the same global batch."""
    out = tmp_path_factory.mktemp("single")
    import subprocess

    p = subprocess.run([sys.executable, *data_args, f"out_dir={out}"], cwd=REPO, env=cpu_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(cluster, data_args, tmp_path_factory) -> dict[str, tuple[Path, float, str]]:
    """2 nodes x 2 ranks for each strategy: {strategy: (run dir, wall seconds, node0's log)}."""
    out: dict[str, tuple[Path, float, str]] = {}
    for strategy in ("ddp", "fsdp", "hsdp"):
        run = tmp_path_factory.mktemp(strategy)
        t0 = time.monotonic()
        nodes = cn.run_on_nodes(2, 2, [*data_args, f"out_dir={run}", f"parallel.strategy={strategy}"], run / "logs")
        out[strategy] = (run, time.monotonic() - t0, nodes[0].log())
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "hsdp"])
def test_two_nodes_end_with_the_single_process_parameters(runs, reference, strategy):
    run, _, log = runs[strategy]
    assert f"4 rank(s) on cpu (gloo), strategy {strategy}" in log, log[-3000:]
    assert sorted(losses(run)) == list(range(1, STEPS + 1))
    ref = losses(reference)
    for step, loss in losses(run).items():
        assert abs(loss - ref[step]) <= TOL, (step, loss, ref[step])
    assert max_param_diff(run, reference) <= TOL


def test_hsdp_checkpoint_is_from_four_ranks(runs):
    """The HSDP run's mesh: 4 ranks, one replica per node (LOCAL_WORLD_SIZE=2 -> 2 replicas x 2 shards)."""
    import json

    run, _, _ = runs["hsdp"]
    meta = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 4 and meta["strategy"] == "hsdp", meta


@pytest.mark.parametrize("nnodes, nproc", [(1, 2), (3, 1)])
def test_hsdp_checkpoint_resumes_on_another_number_of_nodes(cluster, runs, reference, data_args, tmp_path, nnodes,
                                                             nproc):
    run, _, _ = runs["hsdp"]
    shutil.copytree(run / "checkpoints" / "step_00000002", tmp_path / "checkpoints" / "step_00000002")
    nodes = cn.run_on_nodes(nnodes, nproc, [*data_args, f"out_dir={tmp_path}", "parallel.strategy=hsdp"],
                         tmp_path / "logs")
    log = nodes[0].log()
    assert f"written by 4 rank(s), now {nnodes * nproc}" in log and "at step 2" in log, log[-3000:]
    got, ref = losses(tmp_path), losses(reference)
    assert sorted(got) == list(range(3, STEPS + 1))
    for step in got:
        assert abs(got[step] - ref[step]) <= TOL, (step, got[step], ref[step])
    assert max_param_diff(tmp_path, reference) <= TOL
