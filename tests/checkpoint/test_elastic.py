"""Elastic resume: a checkpoint written (asynchronously) by 2 FSDP ranks continues on 1 process and on 3 DDP ranks with the
loss trajectory of the uninterrupted 2-rank run (same global batch, so no sample repeated or skipped)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import read_metrics, run_launcher

ARGS = ["launch/pretrain.py", "--config", "configs/debug.yaml", "train.max_steps=10", "train.batch_size=12",
        "train.micro_batch_size=2", "train.log_interval=1", "eval.interval=0", "eval.steps=2",
        "eval.sample_tokens=0", "checkpoint.keep_last_k=0", "model.bias=false"]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, prepared_byte_data: Path) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    run_launcher([*ARGS, f"data.dir={prepared_byte_data}", f"out_dir={out}", "checkpoint.interval=5", "checkpoint.async_save=true",
                  "parallel.strategy=fsdp"], nproc=2)
    return out


@pytest.mark.parametrize("nproc, strategy", [(1, "single"), (3, "ddp"), (3, "fsdp")])
def test_resume_on_another_world_size(tmp_path: Path, prepared_byte_data: Path, two_rank_run: Path, nproc: int,
                                      strategy: str) -> None:
    # The 2-rank checkpoint's index is JSON (written by DCP's coordinator through SafeWriter), no pickle.
    dcp_dir = two_rank_run / "checkpoints" / "step_00000005" / "dcp"
    assert (dcp_dir / ".metadata.json").is_file() and not (dcp_dir / ".metadata").exists()
    # Start the new run from the 2-rank checkpoint at step 5 (copied: the original stays untouched).
    shutil.copytree(two_rank_run / "checkpoints" / "step_00000005", tmp_path / "checkpoints" / "step_00000005")
    p = run_launcher([*ARGS, f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}",
                      f"parallel.strategy={strategy}"], nproc=nproc)
    assert f"written by 2 rank(s), now {nproc}" in p.stdout and "at step 5" in p.stdout
    ref, got = _losses(two_rank_run), _losses(tmp_path)
    assert sorted(got) == list(range(6, 11))
    for step in range(6, 11):
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
