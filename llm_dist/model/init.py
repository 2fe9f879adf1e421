"""Weight initialisation that gives the same numbers on any device and under any sharding.

Every random draw comes from one CPU `torch.Generator`, one full parameter at a time, and is then
copied to the parameter's device; a parameter sharded as a DTensor (FSDP) keeps only its local shard of
that full draw. So a model initialised in one process, on a GPU, or sharded over N ranks holds
bit-identical weights for the same seed, which is what lets FSDP runs be compared with single-process
runs. Memory cost: one full parameter on the CPU at a time (never the whole model).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full (unsharded) CPU tensor into `param`, keeping only the local shard of a DTensor."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same `full`, so each slices its shard locally (no comm).
        local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full.to(param.dtype))


@torch.no_grad()
def normal_(param: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    """param ~ N(0, std^2), drawn on the CPU (float32) from `generator` (or the global CPU RNG)."""
    if param.is_meta:
        return
    full = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    copy_full_(param, full)
