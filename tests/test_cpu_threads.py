"""llm_dist/distributed.py: CPU runs share the usable cores between a node's ranks unless told otherwise."""

from __future__ import annotations

import torch

from llm_dist.distributed import cpu_threads_for, local_world_size, set_cpu_threads


def test_local_ranks_share_the_cores() -> None:
    assert cpu_threads_for(0, {}, cores=8)[0] == 8
    assert cpu_threads_for(0, {"LOCAL_WORLD_SIZE": "2"}, cores=8)[0] == 4  # two torchrun ranks: cores / 2 each
    assert cpu_threads_for(0, {"LOCAL_WORLD_SIZE": "3"}, cores=8)[0] == 2
    assert cpu_threads_for(0, {"LOCAL_WORLD_SIZE": "16"}, cores=8)[0] == 1  # never 0
    slurm = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert local_world_size(slurm) == 4 and cpu_threads_for(0, slurm, cores=32)[0] == 8
    assert "16 usable core(s) / 2 rank(s)" in cpu_threads_for(0, {"LOCAL_WORLD_SIZE": "2"}, cores=16)[1]


def test_explicit_settings_win() -> None:
    assert cpu_threads_for(0, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, cores=8) == (None, "OMP_NUM_THREADS=3")
    assert cpu_threads_for(5, {"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, cores=8) == (5, "parallel.cpu_threads")


def test_set_cpu_threads_applies_and_says_it(capsys, monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_cpu_threads(1, rank=0) == 1 == torch.get_num_threads()
        assert "CPU threads per rank: 1 (parallel.cpu_threads)" in capsys.readouterr().out
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_cpu_threads(0, rank=1)
        assert capsys.readouterr().out == ""  # only rank 0 says it
    finally:
        torch.set_num_threads(before)
