"""Language-modelling evaluation: mean loss, perplexity and bits per byte over a prepared split.

Bits per byte (bpb) makes models with different tokenizers comparable: a BPE model spends fewer,
harder-to-predict tokens on the same text than a byte-level one, so their per-token losses are not
comparable, but the total information needed to encode the same bytes is:

    bpb = sum over evaluated tokens of NLL (nats) / (ln 2 * number of UTF-8 bytes those tokens stand for)

The byte count is taken from the text of the evaluated tokens themselves: each target token counts
`len(tokenizer.decode_bytes([id]))` bytes (a byte-level BPE's token bytes concatenate to the text, so
the sum is the byte length of the decoded target text). A special token counts the bytes of its own
text (`<|endoftext|>` = 13), as `decode_bytes` defines it. For a byte tokenizer every token is one
byte, so bpb = loss / ln 2.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist import distributed as D
from llm_dist.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the trainer's: targets with this id are not evaluated


def token_byte_lengths(tok: Tokenizer, size: int | None = None) -> torch.Tensor:
    """(size,) int64: the number of UTF-8 bytes each id stands for; ids >= vocab_size (padding) get 0."""
    size = tok.vocab_size if size is None else size
    lengths = torch.zeros(size, dtype=torch.int64)
    for i in range(min(size, tok.vocab_size)):
        lengths[i] = len(tok.decode_bytes([i]))
    return lengths


@dataclass
class LMEval:
    """Totals over every rank and the figures derived from them."""

    nll_sum: float  # sum of per-token negative log-likelihoods, nats
    tokens: int  # evaluated target tokens
    bytes: int  # UTF-8 bytes those tokens stand for

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows float64 past ~709 nats

    @property
    def bpb(self) -> float:
        return self.nll_sum / (math.log(2) * max(self.bytes, 1))

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/ppl": self.ppl, f"{prefix}/bpb": self.bpb}


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[Sequence[Sequence[torch.Tensor]]], byte_lengths: torch.Tensor,
                autocast: contextlib.AbstractContextManager | None = None) -> LMEval:
    """Loss / perplexity / bpb of `model` over `batches` (each a list of this rank's (x, y) micro-batches).

    Collective under a process group: every rank passes its own part of the same global batches and
    gets the totals of all of them. `byte_lengths` comes from `token_byte_lengths` (any device).
    Logits are upcast to fp32 before the log-softmax, as in training.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = byte_lengths.to(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    for micro_batches in batches:
        for mb in micro_batches:
            x, y = mb[0], mb[1]  # (B, T), (B, T)
            with autocast if autocast is not None else contextlib.nullcontext():
                logits = model(x)  # (B, T, V_padded)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="none")  # (B*T,), 0 at ignored targets
            keep = y.flatten() != IGNORE_INDEX
            totals[0] += nll.double().sum()
            totals[1] += keep.sum()
            totals[2] += lengths[y.flatten().clamp(min=0)][keep].sum()
    D.all_reduce_sum(totals)
    model.train(was_training)
    nll_sum, tokens, n_bytes = totals.tolist()
    return LMEval(nll_sum, int(tokens), int(n_bytes))
