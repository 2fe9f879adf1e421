"""Multiple-choice evaluation in the HellaSwag style: which ending does the model find most likely?

Each example is a context and k candidate endings, one of them right. Every ending is scored by the
model's log-likelihood of its tokens given the context:

    acc              argmax over endings of  sum_i log p(ending_i | context, ending_<i)
    acc_norm_tokens  argmax over endings of the same sum divided by the ending's token count (llm.c /
                     nanoGPT / nanochat HellaSwag: length-normalised, the plain sum favours short endings)
    acc_norm_chars   the same sum divided by the ending's length in characters, as given in the file (no
                     joining space): lm-evaluation-harness's `acc_norm` (`len(choice)`), the Open LLM
                     Leaderboard's number. Independent of the tokenizer, so comparable across models.

(The two normalisations pick different endings, and published numbers use both: docs/eval.md says which.)

Files are JSONL, one example per line, in either of two shapes (detected per line):

    HellaSwag, as distributed:  {"ctx": "...", "endings": ["...", ...], "label": 2, ...other fields ignored}
    plain:                      {"context": "...", "endings": ["...", ...], "label": 0}

Context and ending are joined with one space unless the context already ends in whitespace or the
ending starts with it (HellaSwag's endings carry no leading space); the two are tokenized separately,
so the ending's tokens are exactly the ones scored. When context + ending exceed the model's context
length, the oldest context tokens are dropped.

Distributed: rank r scores examples r, r + W, r + 2W, ...; the counts are summed with one all-reduce,
so the accuracy is the single-process one for any number of ranks. Every rank runs the same number of
forward passes (padding with a throw-away batch), which FSDP's collectives need.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llm_dist import distributed as D
from llm_dist.data.jsonl import read_jsonl_rows
from llm_dist.tokenizer import Tokenizer

IGNORE_INDEX = -100


class MCFormatError(ValueError):
    """A malformed multiple-choice file: the message names the file, the line and what was expected."""


@dataclass
class MCExample:
    """One question: a context, its candidate endings and the index of the right one."""

    context: str
    endings: list[str]
    label: int


def parse_mc_line(obj: object, where: str) -> MCExample:
    """One decoded JSONL line (HellaSwag or plain shape) -> MCExample; `where` is "file:line" for errors."""
    if not isinstance(obj, dict):
        raise MCFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = "ctx" if "ctx" in obj else "context"
    context = obj.get(key)
    if not isinstance(context, str):
        raise MCFormatError(f"{where}: expected a string field 'ctx' (HellaSwag) or 'context'")
    endings = obj.get("endings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise MCFormatError(f"{where}: 'endings' must be a list of at least 2 non-empty strings")
    label = obj.get("label")
    if isinstance(label, str) and label.strip().isdigit():  # some HellaSwag exports store the label as "2"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise MCFormatError(f"{where}: 'label' must be an integer index into the {len(endings)} endings, "
                            f"got {obj.get('label')!r}")
    return MCExample(context, list(endings), label)


def load_mc(path: str | Path, limit: int = 0) -> list[MCExample]:
    """Read a multiple-choice JSONL file (blank lines skipped); `limit` > 0 keeps the first `limit` examples."""
    return [parse_mc_line(obj, where) for obj, where in read_jsonl_rows(path, MCFormatError, limit)]


def join_parts(context: str, ending: str) -> tuple[str, str]:
    """(context, ending as appended): one space between them unless either side already has whitespace."""
    if context and not context[-1].isspace() and not ending[:1].isspace():
        ending = " " + ending
    return context, ending


def encode_rows(tok: Tokenizer, ex: MCExample, block_size: int) -> list[tuple[list[int], int]]:
    """Per ending: (token ids of context + ending cropped to block_size from the left, ending token count).

    The ending keeps at least its last block_size - 1 tokens: position 0 has nothing to condition on.
    """
    rows = []
    for ending in ex.endings:
        ctx, end = join_parts(ex.context, ending)
        ctx_ids, end_ids = tok.encode_ordinary(ctx), tok.encode_ordinary(end)
        if not end_ids:
            raise MCFormatError(f"an ending tokenizes to nothing: {ending!r}")
        ids = (ctx_ids + end_ids)[-block_size:]
        n_end = min(len(end_ids), len(ids) - 1)
        if n_end < 1:  # a one-token example with no context: score from the end-of-text token
            ids, n_end = [tok.eot_id] + ids[-(block_size - 1):], 1
        rows.append((ids, n_end))
    return rows


def score_rows(model: nn.Module, rows: list[tuple[list[int], int]], device: torch.device,
               autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """(len(rows), 2) float64: per row, the summed log-probability of its ending tokens and their count.

    Rows are right-padded into one (N, T) batch; causal attention keeps the padding from affecting
    the real positions, and padded targets are ignored. The softmax runs over the real vocabulary only (the
    columns past `vocab_size` pad the LM head for speed and are never sampled): the distribution `generate`
    draws from and the one an exported Hugging Face model computes, so lm-eval's log-likelihoods equal these.
    """
    T = max(len(ids) for ids, _ in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, n_end) in enumerate(rows):
        L = len(ids)
        x[r, :L] = torch.tensor(ids)
        # Logits at position j predict token j+1: the ending's tokens ids[L-n_end:] are targets at L-n_end-1 ... L-2.
        y[r, L - n_end - 1:L - 1] = torch.tensor(ids[L - n_end:])
    x, y = x.to(device), y.to(device)
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = model(x)  # (N, T, V_padded)
    logits = logits[..., :getattr(model, "vocab_size", logits.shape[-1])]  # (N, T, V)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(len(rows), T)  # (N, T), 0 where ignored
    return torch.stack([-nll.double().sum(1), (y != IGNORE_INDEX).sum(1).double()], dim=1)


def _max_over_ranks(n: int, device: torch.device) -> int:
    if D.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def evaluate_mc(model: nn.Module, tok: Tokenizer, examples: list[MCExample], block_size: int,
                batch_size: int = 32, autocast: contextlib.AbstractContextManager | None = None,
                prefix: str = "mc") -> dict[str, float]:
    """Accuracy (`<prefix>/acc`, `<prefix>/acc_norm_tokens`, `<prefix>/acc_norm_chars`) over `examples`, scored
    across every rank.

    Collective under a process group: every rank passes the same full list and takes its own slice.
    `batch_size` counts rows (one per ending); an example's rows always share a batch.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rank, world = D.get_rank(), D.get_world_size()
    mine = [(ex, encode_rows(tok, ex, block_size)) for ex in examples[rank::world]]
    # Group whole examples into batches of about batch_size rows.
    batches: list[list[tuple[MCExample, list[tuple[list[int], int]]]]] = []
    for item in mine:
        if not batches or sum(len(r) for _, r in batches[-1]) + len(item[1]) > max(batch_size, len(item[1])):
            batches.append([])
        batches[-1].append(item)
    n_forward = _max_over_ranks(len(batches), device)
    # correct: by sum, per token, per character; then the example count
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    for b in range(n_forward):
        if b >= len(batches):  # this rank is out of examples: a throw-away forward keeps collectives in step
            score_rows(model, [([tok.eot_id, tok.eot_id], 1)], device, autocast)
            continue
        rows = [row for _, ex_rows in batches[b] for row in ex_rows]
        scores = score_rows(model, rows, device, autocast).cpu()  # (rows, 2)
        i = 0
        for ex, ex_rows in batches[b]:
            s = scores[i:i + len(ex_rows)]
            i += len(ex_rows)
            counts[0] += float(int(s[:, 0].argmax()) == ex.label)
            counts[1] += float(int((s[:, 0] / s[:, 1]).argmax()) == ex.label)
            chars = torch.tensor([float(len(e)) for e in ex.endings], dtype=torch.float64)
            counts[2] += float(int((s[:, 0] / chars).argmax()) == ex.label)
            counts[3] += 1
    D.all_reduce_sum(counts)
    model.train(was_training)
    correct, per_token, per_char, n = counts.tolist()
    return {f"{prefix}/acc": correct / max(n, 1), f"{prefix}/acc_norm_tokens": per_token / max(n, 1),
            f"{prefix}/acc_norm_chars": per_char / max(n, 1), f"{prefix}/n": int(n)}
