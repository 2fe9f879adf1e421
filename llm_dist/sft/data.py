"""SFT examples -> (optionally packed) fixed-length sequences -> resumable global batches.

Sequence construction: an example of ids t_0..t_n (n+1 tokens) contributes inputs t_0..t_{n-1} and
targets t_1..t_n, a target masked with IGNORE_INDEX unless it is a response token. With packing, examples
are placed next-fit, in order, into rows of `seq_len` tokens (order kept, so a curriculum survives
packing); each row carries segment ids (example k of the row = k, padding = -1) for `packed_lm_loss`.
Without packing, one example per row, right-padded (causal attention never looks right, so no segments).

Order of examples each epoch: a permutation seeded by (seed, epoch) — or a fixed curriculum order
(`length`: shortest first; `difficulty`: a row field ascending). Batching follows the pretraining
loader's contract: global batch k is rows [k*B, (k+1)*B) of the epoch's rows continued into the next
epoch; rank r takes its contiguous share and splits it into micro-batches. The position is one global
counter, so resuming (on any number of ranks) continues with exactly the next rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from llm_dist.sft.chat import Conversation, prompt_ids, render
from llm_dist.sft.chat_format import PROJECT, ChatFormat
from llm_dist.tokenizer import Tokenizer
from llm_dist.train.trainer import IGNORE_INDEX


@dataclass
class Example:
    """One tokenised conversation."""

    ids: list[int]  # the whole rendered conversation
    mask: list[bool]  # mask[i]: ids[i] is a response token (a target)
    difficulty: float = 0.0

    @property
    def length(self) -> int:
        """Tokens it occupies in a row (inputs are ids[:-1])."""
        return len(self.ids) - 1


def tokenize(tok: Tokenizer, convs: Sequence[Conversation], seq_len: int, fmt: ChatFormat = PROJECT
             ) -> tuple[list[Example], int, int]:
    """Render in chat format `fmt` and tokenise; cut to seq_len + 1 tokens. Returns (examples, truncated,
    dropped): examples left with no response token after the cut are dropped."""
    out, truncated, dropped = [], 0, 0
    for c in convs:
        ids, mask = render(tok, c.messages, fmt)
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            truncated += 1
        if not any(mask[1:]):
            dropped += 1
            continue
        out.append(Example(ids, mask, c.difficulty))
    return out, truncated, dropped


def eval_prompts(tok: Tokenizer, convs: Sequence[Conversation], fmt: ChatFormat = PROJECT
                 ) -> list[tuple[list[int], str]]:
    """(prompt ids ending in the assistant header, reference reply) for exact-match evaluation."""
    return [(prompt_ids(tok, c.messages[:-1], fmt), c.reference) for c in convs]


def epoch_order(examples: Sequence[Example], epoch: int, seed: int, curriculum: str) -> list[int]:
    """Indices of the examples in this epoch's order."""
    if curriculum == "length":
        return sorted(range(len(examples)), key=lambda i: examples[i].length)  # stable: ties keep file order
    if curriculum == "difficulty":
        return sorted(range(len(examples)), key=lambda i: examples[i].difficulty)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(len(examples), generator=g).tolist()


def pack_rows(examples: Sequence[Example], order: Sequence[int], seq_len: int, pack: bool) -> list[list[int]]:
    """Group example indices into rows of at most seq_len tokens: next-fit in order (pack), else one each."""
    if not pack:
        return [[i] for i in order]
    rows: list[list[int]] = []
    used = seq_len  # forces a new row for the first example
    for i in order:
        n = examples[i].length
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def build_row(examples: Sequence[Example], row: Sequence[int], seq_len: int, pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row: inputs (T,), targets (T,) with IGNORE_INDEX off the responses and on padding, segments (T,)."""
    x = torch.full((seq_len,), pad_id, dtype=torch.long)
    y = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    seg = torch.full((seq_len,), -1, dtype=torch.long)
    at = 0
    for k, i in enumerate(row):
        e = examples[i]
        n = e.length
        ids = torch.tensor(e.ids, dtype=torch.long)
        keep = torch.tensor(e.mask[1:], dtype=torch.bool)
        x[at:at + n] = ids[:-1]
        y[at:at + n] = torch.where(keep, ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
        seg[at:at + n] = k
        at += n
    return x, y, seg


class SFTLoader:
    """Global batches of SFT rows for one rank; `next_batch()` -> this rank's micro-batches."""

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int, micro_batch_size: int,
                 rank: int, world_size: int, *, seed: int = 0, pack: bool = True, curriculum: str = "none",
                 pad_id: int = 0, device: torch.device | str = "cpu") -> None:
        if not examples:
            raise ValueError("SFTLoader: no training examples")
        self.examples, self.seq_len, self.pack = list(examples), seq_len, pack
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.curriculum, self.pad_id, self.device = seed, curriculum, pad_id, torch.device(device)
        self.epoch, self.pos = 0, 0  # next row: row `pos` of epoch `epoch`
        self._rows_epoch: int | None = None
        self._rows: list[list[int]] = []

    def rows(self, epoch: int) -> list[list[int]]:
        """The rows (lists of example indices) of an epoch (cached for the current one)."""
        if self._rows_epoch != epoch:
            order = epoch_order(self.examples, epoch, self.seed, self.curriculum)
            self._rows, self._rows_epoch = pack_rows(self.examples, order, self.seq_len, self.pack), epoch
        return self._rows

    def _take(self, n: int) -> list[list[int]]:
        """The next n rows of the global stream (crossing epoch boundaries), advancing the position."""
        out: list[list[int]] = []
        while len(out) < n:
            rows = self.rows(self.epoch)
            k = min(n - len(out), len(rows) - self.pos)
            out += rows[self.pos:self.pos + k]
            self.pos += k
            if self.pos >= len(rows):
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def _tensors(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
        parts = [build_row(self.examples, r, self.seq_len, self.pad_id) for r in rows]
        x, y, seg = (torch.stack(t).to(self.device) for t in zip(*parts))  # (b, T) each
        return (x, y, seg) if self.pack else (x, y)

    def next_batch(self) -> list[tuple[torch.Tensor, ...]]:
        """This rank's micro-batches of the next global batch: [(x, y[, seg]) each (micro, T)]."""
        rows = self._take(self.batch_size)
        per_rank = self.batch_size // self.world_size
        mine = rows[self.rank * per_rank:(self.rank + 1) * per_rank]
        mb = self.micro_batch_size
        return [self._tensors(mine[i:i + mb]) for i in range(0, len(mine), mb)]

    def set_global_batch(self, global_batch: int) -> None:
        self.batch_size = global_batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "batch_size": self.batch_size}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos, self.batch_size = int(sd["epoch"]), int(sd["pos"]), int(sd["batch_size"])

    def eval_batches(self, examples: Sequence[Example], max_rows: int = 0) -> list[list[tuple[torch.Tensor, ...]]]:
        """Held-out rows (file order), as global batches of this rank's micro-batches for `Trainer.evaluate`.

        The last batch is filled with all-ignored rows, so every rank runs the same number of forwards
        (FSDP needs that) and the padding adds nothing to the loss or the target count.
        """
        rows = pack_rows(examples, range(len(examples)), self.seq_len, self.pack)
        if max_rows:
            rows = rows[:max_rows]
        B = self.batch_size
        rows = rows + [[]] * (-len(rows) % B)
        per_rank, mb = B // self.world_size, self.micro_batch_size
        out = []
        for s in range(0, len(rows), B):
            mine = rows[s + self.rank * per_rank: s + (self.rank + 1) * per_rank]
            parts = [build_row(examples, r, self.seq_len, self.pad_id) for r in mine]
            mbs = []
            for i in range(0, len(parts), mb):
                x, y, seg = (torch.stack(t).to(self.device) for t in zip(*parts[i:i + mb]))
                mbs.append((x, y, seg) if self.pack else (x, y))
            out.append(mbs)
        return out

    def __repr__(self) -> str:
        n = len(self.rows(self.epoch))
        return (f"SFTLoader({len(self.examples)} examples -> {n} rows of {self.seq_len} tokens "
                f"({'packed' if self.pack else 'one example per row'}, order {self.curriculum}), "
                f"global batch {self.batch_size}, rank {self.rank}/{self.world_size})")
