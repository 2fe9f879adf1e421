"""Preference pairs: the accepted row formats, HH transcripts split at their common prefix, tokens, batches.

Rows (JSONL, one object per line):
  {"prompt", "chosen", "rejected"[, "margin"]}   prompt: a string (one user message) or a list of
                                                  messages; chosen/rejected: the two responses (strings)
  {"chosen", "rejected"[, "margin"]}              two whole transcripts sharing a prompt prefix
                                                  (Anthropic HH: "\\n\\nHuman: ...\\n\\nAssistant: ...")
A transcript pair is split at its common prefix, moved back to the end of the last "Assistant:" turn
marker inside it (so a response that starts with the same word as the other keeps that word), or, with no
markers, back to a whitespace boundary. HH prefixes become chat messages (Human -> user, Assistant ->
assistant), so a reward model sees its input exactly as the chat policy writes it:

    <|user|>What is 2+2?<|end|><|assistant|>4<|end|>        the score is read at the final <|end|>

(in the run's `chat.template`: the sequence always ends with the format's end-of-turn token).

Sequences longer than the context keep their *last* tokens (the response and the token scored).
Batches: B pairs per global batch, rank r takes its contiguous share; a micro-batch of m pairs is
(x (2m, T): chosen rows then rejected rows, right-padded; y (m,): 0, or IGNORE_INDEX for padding pairs
so the trainer counts pairs; last (2m,): index of each row's last token; margin (m,)). With `targets`
(the DPO stage, `llm_dist.align`) two more: tgt (2m, T), the next token at each position that predicts a
response token (the response and its <|end|>), IGNORE_INDEX on the prompt and the padding; ref (2m,),
each row's reference log-prob when precomputed (`TokenPair.ref`), else 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from llm_dist.data.jsonl import read_jsonl_rows
from llm_dist.sft.chat import ROLE_TOKENS, DataError
from llm_dist.sft.chat_format import PROJECT, ChatFormat
from llm_dist.sft.data import SFTLoader
from llm_dist.tokenizer import Tokenizer
from llm_dist.train.trainer import IGNORE_INDEX

_TURN = re.compile(r"\n\n(Human|Assistant):")  # HH turn markers
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Pair:
    """One preference: the conversation so far, the preferred and the other response, an optional margin."""

    prompt: list[dict]  # messages before the response ([{"role", "content"}], last one a user message)
    chosen: str
    rejected: str
    margin: float | None = None  # None: reward.margin
    where: str = ""  # "file:line" for error messages


def hh_messages(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c' -> user a, assistant b, user c (text before the first
    marker, if any, is dropped; a trailing empty Assistant turn is the generation prompt, not a message)."""
    parts = _TURN.split(text)  # [before, role, body, role, body, ...]
    msgs = [{"role": _HH_ROLE[role], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2])]
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(shared prompt, chosen response, rejected response) of two transcripts (see the module docstring)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    turns = list(re.finditer(r"\n\nAssistant:", prefix))
    if turns:
        n = turns[-1].end()
    else:
        while n > 0 and not chosen[n - 1].isspace():  # do not cut a word the two responses share
            n -= 1
    return chosen[:n], chosen[n:].strip(), rejected[n:].strip()


def _text(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise DataError(f"{where}: key {key!r} must be a string, got {type(v).__name__}")
    return v


def row_to_pair(row: object, where: str) -> Pair:
    """Normalise one JSON row into a Pair; DataError (one line) names the file:line and the key."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "chosen" not in row or "rejected" not in row:
        raise DataError(f"{where}: expected keys 'chosen' and 'rejected' (and optionally 'prompt', 'margin'), "
                        f"got {sorted(row)[:6]}")
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str):
            prompt = [{"role": "user", "content": p}]
        elif isinstance(p, list) and p and all(isinstance(m, dict) and m.get("role") in ROLE_TOKENS
                                               and isinstance(m.get("content"), str) for m in p):
            prompt = [{"role": m["role"], "content": m["content"]} for m in p]
        else:
            raise DataError(f"{where}: key 'prompt' must be a string or a list of {{role, content}} messages")
    else:
        shared, chosen, rejected = split_transcripts(chosen, rejected)
        prompt = hh_messages(shared) if _TURN.search(shared) else [{"role": "user", "content": shared.strip()}]
        if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt (expected transcripts that "
                            "differ only after a common prompt, e.g. Anthropic HH)")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' responses are identical")
    margin = row.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        raise DataError(f"{where}: key 'margin' must be a finite number, got {margin!r}")
    return Pair(prompt, chosen, rejected, None if margin is None else float(margin), where)


def read_pairs(path: str) -> list[Pair]:
    """Every row of a JSONL file of preference pairs (blank lines skipped)."""
    return [row_to_pair(row, where) for row, where in read_jsonl_rows(path, DataError)]


@dataclass
class TokenPair:
    """A tokenised pair: both whole sequences (prompt + response + end-of-turn) and the margin to use."""

    chosen: list[int]
    rejected: list[int]
    margin: float
    chosen_start: int = 0  # index of the chosen response's first token in `chosen` (after any truncation)
    rejected_start: int = 0  # the same in `rejected`
    ref: tuple[float, float] | None = None  # precomputed reference log-probs (chosen, rejected); DPO only

    @property
    def length(self) -> int:  # for SFTLoader's ordering helpers
        return max(len(self.chosen), len(self.rejected))


def prompt_response(tok: Tokenizer, prompt: list[dict], response: str, fmt: ChatFormat = PROJECT
                    ) -> tuple[list[int], list[int]]:
    """(prompt ids ending in the assistant header, response ids ending in the end-of-turn token) in chat
    format `fmt`: the split a policy sees (it is prompted with the first and generates the second)."""
    return fmt.prompt_ids(tok, prompt), fmt.response_ids(tok, response)


def sequence(tok: Tokenizer, prompt: list[dict], response: str, fmt: ChatFormat = PROJECT) -> list[int]:
    """The chat-formatted sequence a reward model scores: prompt, assistant header, response, end-of-turn."""
    p, r = prompt_response(tok, prompt, response, fmt)
    return p + r


def tokenize_pairs(tok: Tokenizer, pairs: Sequence[Pair], seq_len: int, margin: float,
                   fmt: ChatFormat = PROJECT) -> tuple[list[TokenPair], int]:
    """Tokenise in chat format `fmt`; sequences over seq_len keep their last seq_len tokens. Returns (pairs,
    truncated count).

    Each TokenPair also records where its responses start (the prompt's length, less what truncation cut).
    """
    out, cut = [], 0
    for p in pairs:
        n_prompt = len(fmt.prompt_ids(tok, p.prompt))
        c, r = sequence(tok, p.prompt, p.chosen, fmt), sequence(tok, p.prompt, p.rejected, fmt)
        if len(c) > seq_len or len(r) > seq_len:
            cut += 1
        cs, rs = max(n_prompt - max(len(c) - seq_len, 0), 0), max(n_prompt - max(len(r) - seq_len, 0), 0)
        out.append(TokenPair(c[-seq_len:], r[-seq_len:], margin if p.margin is None else p.margin, cs, rs))
    return out, cut


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences -> (x (n, T) right-padded with pad_id, last (n,) index of each one's last token)."""
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return x, torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)


def response_targets(x: torch.Tensor, starts: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Targets tgt (n, T) of right-padded rows x (n, T): tgt[i, t] = x[i, t + 1] where that token belongs to
    the response (starts[i] <= t + 1 <= last[i]), IGNORE_INDEX elsewhere (prompt, padding, the last column)."""
    n, T = x.shape
    nxt = torch.arange(1, T + 1)[None, :]  # (1, T) index of the token each position predicts
    keep = (nxt >= starts.clamp(min=1)[:, None]) & (nxt <= last[:, None])  # token 0 has no predicting position
    tgt = torch.full_like(x, IGNORE_INDEX)
    tgt[:, :-1] = x[:, 1:]
    return tgt.masked_fill(~keep, IGNORE_INDEX)


def pair_tensors(pairs: Sequence[TokenPair | None], pad_id: int, targets: bool = False) -> tuple[torch.Tensor, ...]:
    """(x (2m, T), y (m,), last (2m,), margin (m,)) of m pairs; None = a padding pair (y = IGNORE_INDEX, its
    rows a single pad token). With `targets`, also (tgt (2m, T), ref (2m,)) (see the module docstring)."""
    pad = [pad_id]
    x, last = right_pad([p.chosen if p else pad for p in pairs] + [p.rejected if p else pad for p in pairs], pad_id)
    y = torch.tensor([IGNORE_INDEX if p is None else 0 for p in pairs], dtype=torch.long)
    margin = torch.tensor([0.0 if p is None else p.margin for p in pairs])
    if not targets:
        return x, y, last, margin
    # a padding pair's start past its last token: no targets at all
    starts = torch.tensor([p.chosen_start if p else 1 for p in pairs] + [p.rejected_start if p else 1 for p in pairs])
    ref = torch.tensor([p.ref[0] if p and p.ref else 0.0 for p in pairs] + [p.ref[1] if p and p.ref else 0.0
                                                                           for p in pairs], dtype=torch.float32)
    return x, y, last, margin, response_targets(x, starts, last), ref


class PairLoader(SFTLoader):
    """Global batches of preference pairs with the SFT loader's contract: a seeded permutation per epoch,
    rank r's contiguous share of each global batch, one global position for exact resume on any world size."""

    def __init__(self, pairs: Sequence[TokenPair], batch_size: int, micro_batch_size: int, rank: int,
                 world_size: int, *, seed: int = 0, pad_id: int = 0, device: torch.device | str = "cpu",
                 targets: bool = False) -> None:
        super().__init__(pairs, 0, batch_size, micro_batch_size, rank, world_size, seed=seed, pack=False,
                         pad_id=pad_id, device=device)
        self.targets = targets  # batches carry the response targets and reference log-probs (DPO)

    def _tensors(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in pair_tensors([self.examples[r[0]] for r in rows], self.pad_id,
                                                             self.targets))

    def eval_batches(self, pairs: Sequence[TokenPair], max_rows: int = 0) -> list[list[tuple[torch.Tensor, ...]]]:
        """Held-out pairs (file order) as global batches of this rank's micro-batches; the last batch is
        filled with padding pairs so every rank runs the same number of forwards (FSDP needs that)."""
        items: list[TokenPair | None] = list(pairs[:max_rows] if max_rows else pairs)
        B = self.batch_size
        items += [None] * (-len(items) % B)
        per_rank, mb = B // self.world_size, self.micro_batch_size
        out = []
        for s in range(0, len(items), B):
            mine = items[s + self.rank * per_rank: s + (self.rank + 1) * per_rank]
            out.append([tuple(t.to(self.device) for t in pair_tensors(mine[i:i + mb], self.pad_id, self.targets))
                        for i in range(0, len(mine), mb)])
        return out

    def __repr__(self) -> str:
        return (f"PairLoader({len(self.examples)} pairs, global batch {self.batch_size} pairs, "
                f"rank {self.rank}/{self.world_size})")
