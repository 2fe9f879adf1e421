"""AdamW with decay / no-decay parameter groups, and learning-rate and batch-size schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from llm_dist.config import OptimConfig, TrainConfig
from llm_dist.model import scratch


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (matmul weights, embeddings), none on biases and norm gains (1-D tensors).

    Deduplicates tied parameters (the embedding shared with the LM head appears once).
    """
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _scratch(model: nn.Module) -> bool:
    """Whether the model was built with `model.ops=scratch` (then the hand-written AdamW and clipping run)."""
    return getattr(getattr(model, "cfg", None), "ops", "torch") == "scratch"


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; the fused CUDA kernel by default on GPU (one launch for all params instead of a loop).

    Under `model.ops=scratch`: the hand-written `llm_dist.model.scratch.AdamW` (same update, same state keys).
    """
    groups = param_groups(model, cfg.weight_decay)
    if _scratch(model):
        return scratch.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "true"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of `model`'s parameters to max_norm (inf = only measure); returns the norm.

    torch's `clip_grad_norm_` (foreach; DTensor-aware under FSDP), or the hand-written one under
    `model.ops=scratch` for plain (unsharded) gradients.
    """
    params = list(model.parameters())
    if _scratch(model) and not any(type(p).__name__ == "DTensor" for p in params):
        return scratch.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to the peak, then the schedule.

    cosine: half-cosine from the peak to min_lr_ratio*peak at max_steps.
    linear: straight line to min_lr_ratio*peak at max_steps.
    constant: the peak after warm-up.
    wsd (warmup-stable-decay): the peak until the last `decay_fraction` of steps, then linear to min lr.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_start = max_steps - int(round(cfg.decay_fraction * max_steps))
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1, max_steps - decay_start)
        return peak + min(frac, 1.0) * (floor - peak)
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return peak + frac * (floor - peak)
    return floor + 0.5 * (1.0 + math.cos(math.pi * frac)) * (peak - floor)  # cosine


def batch_size_at(tokens_seen: int, cfg: TrainConfig, seq_len: int, quantum: int) -> int:
    """Global batch (sequences) for the next step under the optional linear ramp over `batch_ramp_tokens`.

    Rounded down to a multiple of `quantum` (world_size * micro_batch_size) so every rank gets whole
    micro-batches. Depends only on tokens seen, so a resumed run ramps exactly like an uninterrupted one.
    """
    if not cfg.batch_ramp_tokens or tokens_seen >= cfg.batch_ramp_tokens:
        return cfg.batch_size
    frac = tokens_seen / cfg.batch_ramp_tokens
    b = cfg.batch_ramp_start + frac * (cfg.batch_size - cfg.batch_ramp_start)
    return max(quantum, int(b) // quantum * quantum)
