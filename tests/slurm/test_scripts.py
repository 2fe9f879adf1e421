"""The slurm/ job scripts without a cluster: the real scripts run under bash with a fake SLURM environment and
fake `srun`/`scontrol`/`scancel` on PATH that log their arguments (and play the ranks' part). Checks the
launch command (rendezvous endpoint from the node list, port from the job id, ranks per node, overrides),
the requeue decision for every way a run can end, and a USR1 reaching the batch shell being passed on."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu003\\ngpu004\\n'; fi
if [ "$1" = requeue ]; then exit "${FAKE_REQUEUE_RC:-0}"; fi
"""
# Plays the step: optionally waits for scancel's forwarded signal, writes the ranks' exit code, exits.
FAKE_SRUN = """#!/usr/bin/env bash
printf 'srun' >> "$FAKE_LOG"; printf ' %q' "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
if [ -n "${FAKE_WAIT_FILE:-}" ]; then for _ in $(seq 200); do [ -e "$FAKE_WAIT_FILE" ] && break; sleep 0.05; done; fi
if [ -n "${FAKE_CODE:-}" ]; then mkdir -p "$(dirname "$LLM_DIST_EXIT_FILE")"; echo "$FAKE_CODE" > "$LLM_DIST_EXIT_FILE"; fi
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_LOG"
touch "$FAKE_WAIT_FILE"
"""


@pytest.fixture
def fake(tmp_path):
    """Environment of a 2-node job (8 GPUs, 64 CPUs per node) with the fake SLURM commands first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LLM_DIST_", "CONFIG", "NPROC",
                                                                     "LAUNCHER", "OUT_DIR", "RDZV", "OMP_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(tmp_path / "calls.log"), SLURM_JOB_ID="123456",
               SLURM_JOB_NAME="pretrain", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[003-004]",
               SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64", SLURM_CPUS_PER_TASK="64",
               SLURM_SUBMIT_DIR=str(REPO), OUT_DIR=str(tmp_path / "run"))
    return env


def calls(env: dict) -> list[str]:
    p = Path(env["FAKE_LOG"])
    return p.read_text().splitlines() if p.exists() else []


def build_cmd(env: dict, *args: str) -> list[str]:
    script = ('LLM_DIST_ROOT=$SLURM_SUBMIT_DIR; source slurm/common.sh; slurm_build_cmd "$@" && '
              'printf "%s\\n" "${SLURM_CMD[@]}" && echo "MASTER=${MASTER_ADDR:-}:${MASTER_PORT:-}"')
    p = subprocess.run(["bash", "-c", script, "x", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    *cmd, master = p.stdout.splitlines()
    env["_MASTER"] = master.removeprefix("MASTER=")  # what the ranks would see (srun per rank only)
    return cmd


def test_torchrun_command_one_task_per_node(fake):
    fake["OUT_DIR"] = "runs/x"
    cmd = build_cmd(fake, "pretrain", "configs/debug.yaml", "optim.lr=1e-3", "out_dir=mine")
    assert cmd[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=64",
                       "--kill-on-bad-exit=1"]
    i = cmd.index("llm_dist.torchrun")  # torchrun, with an unreachable rendezvous as one line
    assert cmd[i - 1] == "-m" and cmd[i - 2] == "python3"
    # first host of gpu[003-004] (from scontrol), port 20000 + 123456 % 20000, the job id as rendezvous id
    assert cmd[i + 1:i + 8] == ["--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d",
                                "--rdzv-endpoint=gpu003:23456", "--rdzv-id=123456", "--max-restarts=0",
                                "--rdzv-conf=read_timeout=60,join_timeout=600"]
    # the stage with the config, the run directory, then the user's overrides (the last out_dir wins)
    assert cmd[i + 8:] == [f"{REPO}/launch/pretrain.py", "--config", "configs/debug.yaml", "out_dir=runs/x",
                           "optim.lr=1e-3", "out_dir=mine"]
    assert "scontrol show hostnames gpu[003-004]" in calls(fake)
    assert fake["_MASTER"] == ":"  # torchrun sets the workers' master itself
    # torchrun must outlive the SIGUSR1 that SLURM sends to every process of the step
    assert cmd[6:8] == ["bash", "-c"] and cmd[8].startswith('trap "" USR1; exec')


def test_torchrun_overrides_from_the_environment(fake):
    fake.update(NPROC_PER_NODE="4", RDZV_PORT="29400", MAX_RESTARTS="3", PYTHON="/opt/py/bin/python",
                SLURM_NNODES="1", SLURM_JOB_NODELIST="node7")
    fake.pop("SLURM_CPUS_PER_TASK")
    cmd = build_cmd(fake, "grpo", "c.yaml")
    assert "--nproc_per_node=4" in cmd and "--rdzv-endpoint=gpu003:29400" in cmd and "--max-restarts=3" in cmd
    assert "/opt/py/bin/python" in cmd and "--cpus-per-task=64" in cmd and cmd[-3:-1] == ["--config", "c.yaml"]
    assert f"{REPO}/launch/grpo.py" in cmd


def test_srun_command_one_task_per_rank(fake):
    fake["LAUNCHER"] = "srun"
    cmd = build_cmd(fake, "sft", "configs/sft_gsm8k.yaml")
    assert cmd[:7] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--cpus-per-task=8",
                       "--kill-on-bad-exit=1", "python3"]
    assert cmd[7:10] == ["-u", f"{REPO}/launch/sft.py", "--config"] and "llm_dist.torchrun" not in cmd
    assert fake["_MASTER"] == "gpu003:23456"  # the first host and the job's port, for every rank


def test_unknown_launcher_is_one_line(fake):
    fake["LAUNCHER"] = "mpirun"
    p = subprocess.run(["bash", "slurm/pretrain.sh"], cwd=REPO, env=fake, capture_output=True, text=True)
    assert p.returncode == 2 and "LAUNCHER=mpirun is not one of: torchrun, srun" in p.stderr


def test_script_outside_the_repository_says_so(fake, tmp_path):
    fake["SLURM_SUBMIT_DIR"] = str(tmp_path)
    p = subprocess.run(["bash", str(REPO / "slurm/pretrain.sh")], cwd=tmp_path, env=fake, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "LLM_DIST_ROOT" in p.stderr


@pytest.mark.parametrize("code, srun_rc, job_rc, requeued", [
    ("75", "1", 0, True),     # stopped by the signal, checkpoint saved (torchrun turned 75 into 1): requeue
    ("75", "75", 0, True),    # the same under LAUNCHER=srun, where srun passes the ranks' 75 on
    ("0", "0", 0, False),     # finished: never requeued, even if a signal came late
    ("2", "1", 2, False),     # bad config: the run's own exit code is the job's
    ("3", "1", 3, False),     # NaN/Inf halt
    ("", "1", 1, False),      # a crash (no code written): srun's exit code
    ("0", "1", 1, False),     # rank 0 finished, another rank crashed
])
def test_requeue_decision(fake, code, srun_rc, job_rc, requeued):
    fake.update(FAKE_SRUN_RC=srun_rc, SLURM_RESTART_COUNT="2")
    if code:
        fake["FAKE_CODE"] = code
    stale = Path(fake["OUT_DIR"]) / "slurm-exit-code"
    stale.parent.mkdir(parents=True)
    stale.write_text("75\n")  # left by an earlier instance of the job: must not count
    p = subprocess.run(["bash", "slurm/pretrain.sh", "train.max_steps=5"], cwd=REPO, env=fake, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == job_rc, p.stdout + p.stderr
    log = calls(fake)
    assert ("scontrol requeue 123456" in log) == requeued, log
    assert any(c.startswith("srun ") and c.endswith("train.max_steps=5") for c in log)
    if requeued:
        assert "requeueing job 123456 (restart 3)" in p.stdout
    assert "job 123456 (restart 2)" in p.stdout


def test_failed_requeue_exits_75(fake):
    fake.update(FAKE_CODE="75", FAKE_SRUN_RC="1", FAKE_REQUEUE_RC="1")
    p = subprocess.run(["bash", "slurm/pretrain.sh"], cwd=REPO, env=fake, capture_output=True, text=True, timeout=60)
    assert p.returncode == 75 and "resubmit with OUT_DIR=" in p.stderr


def test_usr1_to_the_batch_shell_reaches_the_steps(fake, tmp_path):
    """`--signal=B:USR1@...` or `scancel --batch`: the shell passes it on (scancel to the steps), the step ends
    with the ranks' 75, and the job requeues."""
    fake.update(FAKE_WAIT_FILE=str(tmp_path / "forwarded"), FAKE_CODE="75", FAKE_SRUN_RC="1")
    proc = subprocess.Popen(["bash", "slurm/pretrain.sh"], cwd=REPO, env=fake, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(c.startswith("srun ") for c in calls(fake)):
            assert time.monotonic() < deadline and proc.poll() is None, "srun never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    log = calls(fake)
    assert "scancel --signal=USR1 123456" in log and "scontrol requeue 123456" in log, log
    assert "passing it on to the job's steps" in out
