"""Launch-environment parsing (torchrun and srun-started ranks) and the single-process fallback."""

from __future__ import annotations

import torch

from llm_dist import distributed as D


def test_single_process_without_launcher() -> None:
    env = D.read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "none")
    rt = D.init_runtime(device="cpu")
    assert rt.world_size == 1 and not rt.distributed and rt.device == torch.device("cpu") and rt.backend == ""
    t = torch.ones(3)
    assert D.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]  # no process group: identity
    D.barrier()
    D.shutdown()


def test_torchrun_variables_win_over_slurm() -> None:
    env = D.read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                             "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (3, 1, 8, "torchrun")


def test_srun_started_ranks_use_slurm_variables() -> None:
    env = D.read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu[007-008,010],cpu1", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.local_rank, env.world_size, env.launcher) == (5, 1, 8, "slurm")
    assert env.master_addr == "gpu007" and env.master_port == str(20000 + 123456 % 20000)
    # A one-task allocation running torchrun inside is not a SLURM-launched multi-rank job.
    assert D.read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"


def test_first_host_of_nodelists() -> None:
    assert D.first_host("node1") == "node1"
    assert D.first_host("node[1-4]") == "node1"
    assert D.first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert D.first_host("a-b-c[10,2]") == "a-b-c10"


def test_rank_seeds_are_distinct_and_pure() -> None:
    seeds = [D.rank_seed(1337, r) for r in range(64)]
    assert len(set(seeds)) == 64 and seeds == [D.rank_seed(1337, r) for r in range(64)]


def test_flattened_configs_name_the_keys_that_differ() -> None:
    a = D.flatten_config({"train": {"batch_size": 8, "lr": 1e-3}, "out_dir": "runs/x", "data": {"files": ["a"]}})
    b = D.flatten_config({"train": {"batch_size": 4, "lr": 1e-3}, "out_dir": "runs/x", "data": {"files": ["b"]},
                          "extra": {"k": None}})
    assert a["train.batch_size"] == "8" and a["data.files"] == '["a"]'
    assert D.config_differences(a, b) == ["data.files", "extra.k", "train.batch_size"]
    assert D.config_differences(a, dict(a)) == []


def test_same_config_check_is_free_in_one_process() -> None:
    D.check_same_config({"train": {"batch_size": 8}})  # no process group: nothing to compare with


def test_srun_started_ranks_know_their_node_size_for_hsdp() -> None:
    """Under `LAUNCHER=srun` torchrun's LOCAL_WORLD_SIZE is missing; HSDP's default mesh (one replica per
    node) comes from --ntasks-per-node, else from SLURM_TASKS_PER_NODE."""
    base = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[0-1]"}
    assert D.read_launch_env({**base, "SLURM_NTASKS_PER_NODE": "2"}).local_world_size == 2
    assert D.read_launch_env({**base, "SLURM_TASKS_PER_NODE": "2(x2)"}).local_world_size == 2
    assert D.read_launch_env(base).local_world_size is None
