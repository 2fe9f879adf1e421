"""Packed sequences: several examples per row, attention and positions confined to each example.

The model's forward takes token ids and an optional left-padding mask; it has no notion of segments.
Rather than editing the model, `enable_packing(model)` installs two small interceptions on a built
`Transformer`, active only inside `with packed(segment_ids):`

* `positions`: each token's position restarts at 0 at the start of its example, so an example sees the
  same learned / sinusoidal / rotary positions wherever it sits in the pack;
* a forward pre-hook on every `Block` puts a block-diagonal causal mask into the forward's shared
  `AttnMeta` mask cache (one per distinct window/sinks):
      allowed(q, k) = seg[q] == seg[k]  and  causal/windowed on the restarted positions.
  Attention then takes its explicit-mask path (SDPA with a boolean mask, or the manual reference).

Hooks work through DDP, FSDP2 (blocks keep their class) and activation checkpointing: the recomputation
in backward re-enters the block with the same `AttnMeta` object, whose mask is already cached, so it does
not matter that the `packed` context has been left by then. Outside the context nothing changes.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from llm_dist.model.attention import attention_mask
from llm_dist.model.transformer import Block, Transformer
from llm_dist.train.trainer import Batch, causal_lm_loss

_ACTIVE: list[torch.Tensor] = []  # the segment ids (B, T) of the packed forward in progress, if any


@contextlib.contextmanager
def packed(segments: torch.Tensor) -> Iterator[None]:
    """Run the forwards inside with examples confined by `segments` (B, T) int: equal id = same example.

    Ids must be contiguous runs within a row (an example is one stretch of tokens).
    """
    _ACTIVE.append(segments)
    try:
        yield
    finally:
        _ACTIVE.pop()


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, T) positions restarting at 0 at each change of id."""
    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, T): where my example began
    return t - first


def _current(idx: torch.Tensor) -> torch.Tensor | None:
    if not _ACTIVE or _ACTIVE[-1].shape != idx.shape[:2]:
        return None
    return _ACTIVE[-1].to(idx.device)


def enable_packing(model: nn.Module) -> None:
    """Install the segment-aware positions and block-mask hooks on a bare Transformer (idempotent)."""
    if not isinstance(model, Transformer):
        raise TypeError(f"enable_packing needs the bare Transformer, got {type(model).__name__}")
    if getattr(model, "_packing_enabled", False):
        return
    original = model.positions  # bound method of the class

    def positions(idx, kv_cache=None, attn_mask=None):  # noqa: ANN001, ANN202 - same signature as the model's
        seg = _current(idx) if kv_cache is None and attn_mask is None else None
        if seg is None:
            return original(idx, kv_cache, attn_mask)
        # "padded": per-row positions (B, T); the host bound T-1 avoids a device sync.
        return segment_positions(seg), True, idx.shape[1] - 1

    model.positions = positions  # instance attribute: shadows the method for this model only

    def pre_hook(block: nn.Module, args: tuple) -> None:
        x, meta = args[0], args[1] if len(args) > 1 else None
        seg = _current(x)
        if seg is None or meta is None:
            return
        attn = block.attn
        key = (attn.window, attn.sinks)
        if key not in meta._masks:
            same = seg[:, None, :, None] == seg[:, None, None, :]  # (B, 1, T, T)
            meta._masks[key] = attention_mask(meta.q_pos, meta.q_pos, attn.window, attn.sinks) & same

    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_pre_hook(pre_hook)
    model._packing_enabled = True


def packed_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """`causal_lm_loss` for batches (x, y, segments): the forward runs under `packed(segments)`.

    Batches without segments (x, y) fall back to the plain causal loss.
    """
    if len(batch) < 3:
        return causal_lm_loss(model, batch)
    with packed(batch[2]):  # segments (B, T); MoE aux losses included as in the plain loss
        return causal_lm_loss(model, batch[:2])
