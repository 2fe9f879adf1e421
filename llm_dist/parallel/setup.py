"""Build the model for a parallel strategy: meta device -> AC -> compile -> shard -> materialise -> init.

single  one process, the plain module.
ddp     every rank holds the whole model; gradients are all-reduced (bucketed) after the last micro-batch.
fsdp    FSDP2 (`fully_shard`) per transformer block and at the root, on a 1-D mesh over all ranks:
        parameters, gradients and optimizer state are sharded; each block's parameters are all-gathered
        just before use and freed after (`reshard_after_forward`); gradients are reduce-scattered.
hsdp    FSDP2 on a 2-D mesh (replicas x shards): sharded within a replica group (usually one node, fast
        links), replicated across groups (gradients all-reduced between them).

LoRA (`model.lora.rank` > 0) swaps the target linears for adapted ones and freezes the rest right after the
meta-device build, so AC, compile and FSDP see the final module tree: FSDP2 shards frozen base weights and
trainable adapters together in each block's one parameter group; only the adapters get gradients,
reduce-scatters and optimizer state. DDP skips the frozen parameters (no hooks, no all-reduce).

The model is constructed on the meta device (no memory), wrapped and sharded there, then materialised
with `to_empty` (each rank allocates only its shards) and initialised once from a seeded CPU generator
(`llm_dist/model/init.py`), so its weights are identical to the single-process model's for any sharding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from llm_dist.config import Config, ConfigError
from llm_dist.distributed import Runtime
from llm_dist.model.lora import apply_lora, init_lora_
from llm_dist.model.transformer import Transformer
from llm_dist.parallel.ac import apply_activation_checkpointing

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ParallelModel:
    """The module to train with (maybe DDP-wrapped) and the bare model inside it."""

    module: nn.Module  # call this for forward/backward: DDP wrapper, or the FSDP-sharded model itself
    model: Transformer  # the bare model (under FSDP, the same object as `module`)
    strategy: str  # single | ddp | fsdp | hsdp
    mesh: DeviceMesh | None = None  # fsdp/hsdp device mesh

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp", "hsdp")


def resolve_strategy(requested: str, world_size: int) -> str:
    """auto -> ddp with several ranks, single with one. fsdp/hsdp need a process group."""
    if requested == "auto":
        return "ddp" if world_size > 1 else "single"
    if requested in ("fsdp", "hsdp", "ddp") and world_size == 1:
        return "single"  # one rank: nothing to shard or replicate; same numerics, no process group needed
    return requested


def build_mesh(strategy: str, rt: Runtime, replicas: int) -> DeviceMesh:
    """1-D mesh ("dp_shard",) for fsdp; 2-D ("dp_replicate", "dp_shard") for hsdp."""
    if strategy == "fsdp":
        return init_device_mesh(rt.device.type, (rt.world_size,), mesh_dim_names=("dp_shard",))
    if not replicas:  # default: one replica per node, shards within the node
        replicas = rt.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    if rt.world_size % replicas:
        raise ConfigError(f"parallel.hsdp_replicas={replicas} must divide the world size {rt.world_size}")
    return init_device_mesh(rt.device.type, (replicas, rt.world_size // replicas),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype,
               reshard_after_forward: bool, cpu_offload: bool) -> None:
    """fully_shard each block, then the root (embeddings, final norm, LM head), in place."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # The last block's parameters would be all-gathered again at once for backward: keep them.
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)


def build_parallel_model(cfg: Config, rt: Runtime, amp_dtype: torch.dtype, frozen: tuple[str, ...] = ()
                         ) -> ParallelModel:
    """Construct, wrap, shard and initialise the model for `parallel.strategy` (seeded by `train.seed`).

    `frozen`: parameter names that get no gradient (e.g. a reward model's unused, untied LM head). They
    are frozen before DDP is built, which otherwise waits for their gradients and fails.
    """
    strategy = resolve_strategy(cfg.parallel.strategy, rt.world_size)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    params = dict(model.named_parameters())
    for name in frozen:
        if name not in params:
            raise KeyError(f"cannot freeze {name!r}: the model has no such parameter")
        params[name].requires_grad_(False)
    if cfg.model.lora.rank:  # before AC, compile and sharding, like every other change to the module tree
        apply_lora(model, cfg.model.lora)
    model.loss_impl, model.loss_chunk_size = cfg.loss.impl, cfg.loss.chunk_size  # read by Transformer.lm_loss
    apply_activation_checkpointing(model.blocks, cfg.parallel)
    sharded = strategy in ("fsdp", "hsdp")
    if cfg.train.compile:
        # In-place `.compile()` keeps parameter names free of `_orig_mod.`; under FSDP each block is its
        # own graph so the all-gathers between blocks stay outside the compiled code.
        # Compiled whole, the model's forward includes the loss (`Transformer.lm_loss`), so the fp32 logits
        # upcast fuses into the log-softmax; per block, the head + loss get their own compiled function.
        for block in (model.blocks if sharded else [model]):
            block.compile(mode=cfg.train.compile_mode)
        if sharded:
            model.compile_loss(cfg.train.compile_mode)
    mesh = None
    if sharded:
        mesh = build_mesh(strategy, rt, cfg.parallel.hsdp_replicas)
        # FSDP casts the gathered parameters for compute (no autocast needed); grads reduce in reduce_dtype.
        param_dtype = amp_dtype if amp_dtype != torch.float32 else None
        apply_fsdp(model, mesh, param_dtype, _DTYPES[cfg.parallel.reduce_dtype], cfg.parallel.reshard_after_forward,
                   cfg.parallel.cpu_offload)
    model.to_empty(device="cpu" if cfg.parallel.cpu_offload else rt.device)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    model.init_weights(generator=gen)
    init_lora_(model, gen)  # LoRA: A random, B = 0 (a no-op without adapters)
    if strategy == "ddp":
        module: nn.Module = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                bucket_cap_mb=cfg.parallel.ddp_bucket_mb)
    else:
        module = model
    return ParallelModel(module, model, strategy, mesh)
