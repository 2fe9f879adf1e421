"""Activation checkpointing: trade recomputation for activation memory, per transformer block.

- full: every block keeps only its input; everything inside is recomputed during backward.
- selective, layer: every k-th block is checkpointed fully, the others keep all activations.
- selective, op: every block saves the outputs of its matmuls and attention (the expensive ops) and
  recomputes the cheap element-wise ones (norms, activations, dropout masks, residual adds).

Non-reentrant `torch.utils.checkpoint` (composes with FSDP2, torch.compile and autograd hooks) via
`checkpoint_wrapper`, whose state-dict hooks strip the wrapper's prefix, so parameter names and
checkpoints are the same with or without activation checkpointing.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from llm_dist.config import ParallelConfig

aten = torch.ops.aten

# Outputs worth keeping: each costs O(n^2)-O(n^3) FLOPs to recompute but O(n^2) memory to store.
_SAVE = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.linear.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ANN001
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap(block: nn.Module, op_level: bool) -> nn.Module:
    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _save_matmuls)} if op_level else {}
    # preserve_rng_state (the default) replays the same dropout masks during recomputation.
    return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)


def apply_activation_checkpointing(blocks: nn.ModuleList, cfg: ParallelConfig) -> int:
    """Wrap blocks in place according to `parallel.ac`; returns how many blocks were wrapped."""
    wrapped = 0
    for i, block in enumerate(blocks):
        if cfg.ac == "full" or (cfg.ac == "selective" and cfg.ac_selective == "op"):
            blocks[i] = _wrap(block, op_level=cfg.ac == "selective")
        elif cfg.ac == "selective" and i % cfg.ac_every == 0:
            blocks[i] = _wrap(block, op_level=False)
        else:
            continue
        wrapped += 1
    return wrapped
