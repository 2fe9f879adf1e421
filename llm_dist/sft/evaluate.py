"""Batched completion of token prompts, and exact-match accuracy on a held-out split (greedy decoding).

`complete` left-pads prompts of different lengths into one batch for the KV-cache generator
(`llm_dist.model.generate`, `attention_mask=`) and cuts each completion after its first stop token.
Under FSDP every forward is a collective, so `lockstep=True` makes each call decode exactly
`max_new_tokens` steps (no early stop when all rows finished) and the caller runs the same number of
calls on every rank.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llm_dist import distributed as D
from llm_dist.model.generate import generate
from llm_dist.sft.chat import answers_match
from llm_dist.tokenizer import Tokenizer


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T0) ids with each prompt right-aligned, and the (B, T0) mask of real tokens."""
    T0 = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T0), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T0), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T0 - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, T0 - len(p):] = 1
    return idx.to(device), mask.to(device)


def complete(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, stop_id: int | None = None,
             generator: torch.Generator | None = None, lockstep: bool = False, pad_id: int = 0
             ) -> list[list[int]]:
    """Completions (new tokens only, up to and including the first `stop_id`) of every prompt, one batch."""
    device = next(model.parameters()).device
    idx, mask = left_pad(prompts, pad_id, device)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=None if lockstep else stop_id, generator=generator,
                   attention_mask=mask if not bool(mask.all()) else None)
    new = out[:, idx.shape[1]:].tolist()  # (B, n)
    if stop_id is not None:
        new = [row[: row.index(stop_id) + 1] if stop_id in row else row for row in new]
    return new


def exact_match(model: torch.nn.Module, tok: Tokenizer, items: Sequence[tuple[list[int], str]], mode: str,
                max_new_tokens: int, batch_size: int, stop_id: int, lockstep: bool = False
                ) -> tuple[float, list[str]]:
    """Share of held-out (prompt ids, reference) items whose greedy reply matches, over all ranks.

    Each rank decodes items rank, rank + W, ...; counts are summed with one all-reduce. Returns
    (accuracy, this rank's decoded replies) — the replies help when reading a run's log.
    """
    rank, world = D.get_rank(), D.get_world_size()
    mine = list(items[rank::world])
    n_batches = -(-len(items) // (world * batch_size))  # the same on every rank (lockstep under FSDP)
    correct, replies = 0, []
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        prompts = [p for p, _ in chunk] or [items[0][0]]  # an idle rank still joins the collectives
        outs = complete(model, prompts, max_new_tokens, stop_id=stop_id, lockstep=lockstep, pad_id=stop_id)
        for (_, ref), ids in zip(chunk, outs):
            text = tok.decode([i for i in ids if i != stop_id])
            replies.append(text)
            correct += answers_match(text, ref, mode)
    counts = torch.tensor([float(correct), float(len(mine))], dtype=torch.float64,
                          device=next(model.parameters()).device)
    D.all_reduce_sum(counts)
    return (counts[0] / counts[1].clamp(min=1)).item(), replies
