"""The slurm/ scripts on a real SLURM cluster (CPU partition, gloo, 2 ranks): pretraining and GRPO jobs
complete; a job sent `scancel --signal=USR1` mid-run saves, requeues itself and finishes with the parameters
of an uninterrupted run; a bad config fails the job with the config error in its output file.

Needs a cluster: CI starts one with `tools/ci/slurm_up.sh` (2 nodes; these jobs use one, tests/multinode
both) and sets LLM_DIST_SLURM=1. Without the
variable these tests are skipped; with it, a cluster that does not answer is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, cpu_env, final_params, read_metrics

pytestmark = pytest.mark.slurm

JOB_TIMEOUT_S = 240
# The debug model for 60 steps: 2 ranks, 2 micro-batches each (global batch 8), a checkpoint every 20 steps.
PRETRAIN_ARGS = ["train.max_steps=60", "train.log_interval=5", "checkpoint.interval=20", "eval.interval=30",
                 "eval.sample_tokens=0"]


@pytest.fixture(scope="module")
def cluster() -> int:
    """CPUs of the cluster's node; skips without LLM_DIST_SLURM=1, fails when it is set but SLURM is unusable."""
    if os.environ.get("LLM_DIST_SLURM") != "1":
        pytest.skip("no SLURM cluster: set LLM_DIST_SLURM=1 after `bash tools/ci/slurm_up.sh` (CI does)")
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T %c"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"LLM_DIST_SLURM=1 but sinfo cannot run: {e}")
    states = p.stdout.split()
    if p.returncode != 0 or not states or states[0].rstrip("*") not in ("idle", "mixed", "allocated", "completing"):
        pytest.fail(f"LLM_DIST_SLURM=1 but the cluster is not usable: sinfo -> {p.stdout.strip()!r} {p.stderr.strip()!r}")
    return int(states[1])


def job_env(**extra: str) -> dict[str, str]:
    """What the job inherits (sbatch exports the submitting environment): this Python, 2 ranks per node."""
    return cpu_env(PYTHON=sys.executable, NPROC_PER_NODE="2", **extra)


def sbatch(script: str, args: list[str], env: dict[str, str], cpus: int, wait: bool = True) -> tuple[int, str]:
    """Submit slurm/<script> from the repository root on the CPU partition; (exit code, job id).

    `--wait` returns the job's exit code once it ended (through any requeues); otherwise 0 and the id."""
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={cpus}", *(["--wait"] if wait else []),
           f"slurm/{script}", *args]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = p.stdout.readline().strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch failed: {p.stderr.read() if p.poll() is not None else ''}"
    try:
        p.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", job_id])
        p.kill()
        pytest.fail(f"job {job_id} did not end in {JOB_TIMEOUT_S}s:\n{job_log(script, job_id)[-3000:]}")
    return p.returncode, job_id


def job_log(script: str, job_id: str) -> str:
    """The job's output file: logs/<job name>-<job id>.out (the scripts' default)."""
    p = REPO / "logs" / f"{script.removesuffix('.sh')}-{job_id}.out"
    return p.read_text(errors="replace") if p.exists() else f"(no output file {p})"


@pytest.fixture(scope="module")
def logs_cleanup():
    made: list[Path] = []
    yield made
    for p in made:
        p.unlink(missing_ok=True)


def finished_job(script: str, job_id: str, logs_cleanup: list[Path]) -> str:
    logs_cleanup.append(REPO / "logs" / f"{script.removesuffix('.sh')}-{job_id}.out")
    return job_log(script, job_id)


@pytest.fixture(scope="module")
def pretrain_run(cluster, prepared_byte_data, tmp_path_factory, logs_cleanup) -> Path:
    """`sbatch --wait slurm/pretrain.sh` with the debug config, one rank per srun task (LAUNCHER=srun)."""
    out = tmp_path_factory.mktemp("slurm") / "pretrain"
    env = job_env(CONFIG="configs/debug.yaml", LAUNCHER="srun", OUT_DIR=str(out))
    rc, job_id = sbatch("pretrain.sh", [f"data.dir={prepared_byte_data}", *PRETRAIN_ARGS], env, cluster)
    log = finished_job("pretrain.sh", job_id, logs_cleanup)
    assert rc == 0, log[-3000:]
    assert "2 rank(s) on cpu (gloo), strategy ddp" in log and "slurm: run finished" in log, log[-3000:]
    return out


def test_pretrain_job_completes_with_a_checkpoint(pretrain_run):
    ckpt = pretrain_run / "checkpoints" / "step_00000060"
    assert (ckpt / "COMPLETE").exists()
    assert [r["step"] for r in read_metrics(pretrain_run) if "loss" in r][-1] == 60
    assert (pretrain_run / "slurm-exit-code").read_text() == "0\n"


def test_usr1_mid_run_saves_requeues_and_finishes_like_an_uninterrupted_run(
        cluster, pretrain_run, prepared_byte_data, tmp_path, logs_cleanup):
    """torchrun per node this time; the reference is the uninterrupted srun-per-rank run (same 2 DDP ranks)."""
    out = tmp_path / "pretrain"
    env = job_env(CONFIG="configs/debug.yaml", OUT_DIR=str(out))
    _, job_id = sbatch("pretrain.sh", [f"data.dir={prepared_byte_data}", *PRETRAIN_ARGS], env, cluster, wait=False)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (out / "metrics.jsonl").exists() or not any(r.get("step", 0) >= 5 for r in read_metrics(out)):
        if time.monotonic() > deadline or not job_listed(job_id):
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} never reached step 5:\n{job_log('pretrain.sh', job_id)[-3000:]}")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    while job_listed(job_id):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} did not end:\n{job_log('pretrain.sh', job_id)[-3000:]}")
        time.sleep(0.5)
    log = finished_job("pretrain.sh", job_id, logs_cleanup)

    assert "received SIGUSR1" in log and f"requeueing job {job_id} (restart 1)" in log, log[-3000:]
    saved = re.search(r"training stopped at step (\d+)", log)
    assert saved and 5 <= int(saved.group(1)) < 60, log[-3000:]
    assert f"job {job_id} (restart 1)" in log  # the same job id came back...
    assert f"resumed from {out}/checkpoints/step_{int(saved.group(1)):08d}" in log  # ...from the signal's checkpoint
    assert "slurm: run finished" in log and log.count("requeueing") == 1, log[-3000:]
    assert (out / "slurm-exit-code").read_text() == "0\n"
    got, want = final_params(out), final_params(pretrain_run)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def job_listed(job_id: str) -> bool:
    """The job is pending, running or being requeued (a finished one drops out of squeue)."""
    p = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return p.returncode == 0 and bool(p.stdout.strip())


def test_grpo_job_completes(cluster, pretrain_run, tmp_path, logs_cleanup):
    """`sbatch --wait slurm/grpo.sh`: 2 GRPO steps on 1-digit addition from the pretrained checkpoint."""
    env = job_env(CONFIG="configs/grpo_addition.yaml", OUT_DIR=str(tmp_path / "grpo"))
    args = [f"rl.init_from={pretrain_run}", "rl.task_level=1", "rl.group_size=4", "rl.max_new_tokens=4",
            "rl.eval_examples=8", "rl.eval_batch_size=8", "train.batch_size=16", "train.micro_batch_size=4",
            "train.max_steps=2", "train.log_interval=1", "optim.warmup_steps=0", "eval.interval=0"]
    rc, job_id = sbatch("grpo.sh", args, env, cluster)
    log = finished_job("grpo.sh", job_id, logs_cleanup)
    assert rc == 0, log[-3000:]
    assert (tmp_path / "grpo" / "checkpoints" / "step_00000002" / "COMPLETE").exists(), log[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "grpo") if "reward_mean" in r] == [1, 2]


def test_bad_config_fails_the_job_with_the_error_in_its_output(cluster, tmp_path, logs_cleanup):
    env = job_env(CONFIG="configs/debug.yaml", OUT_DIR=str(tmp_path / "bad"))
    rc, job_id = sbatch("pretrain.sh", ["optim.lrr=1e-3"], env, cluster)
    log = finished_job("pretrain.sh", job_id, logs_cleanup)
    assert rc == 2, log  # the run's exit code, not torchrun's 1
    assert "config error: unknown config key 'optim.lrr'; did you mean optim.lr?" in log
    assert "slurm: run failed with exit code 2" in log and "requeueing" not in log
    assert not (tmp_path / "bad" / "checkpoints").exists()
