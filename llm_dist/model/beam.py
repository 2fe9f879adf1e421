"""Beam search over a KV cache: num_beams hypotheses per prompt, length penalty, early stopping.

Every prompt keeps `num_beams` running hypotheses; all B * num_beams of them are one batch of the
model, sharing one KV cache whose rows are reordered (`KVCache.reorder`) to follow each surviving
beam's parent. Per step:

    cand[b, (i, t)] = score[b, i] + log p(t | beam i)            (B, K * V)
    take the 2K best candidates; one ending in eos (among the best K) becomes a finished hypothesis
    with score sum(log p) / len ** length_penalty (len = generated tokens, eos included); the best K
    that do not end in eos continue.

A prompt is done when it holds K finished hypotheses and either `early_stopping` is set or no running
beam can beat the worst of them any more (the best running sum(log p) / len ** length_penalty is no
better: Hugging Face's default heuristic, exact for length_penalty <= 0 since log-probs only fall).
At the end, prompts that are not done add their running beams as hypotheses. length_penalty > 0
favours longer sequences, < 0 shorter ones. The per-prompt bookkeeping is a loop over 2K candidates per
prompt per step on the host; the model work is batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm_dist.model.generate import check_left_padding, decoding_mode, make_cache
from llm_dist.model.layers import upcast
from llm_dist.model.transformer import Transformer


@dataclass
class BeamOutput:
    """The best hypothesis per prompt."""

    sequences: torch.Tensor  # (B, T0 + n) int64: prompt + generated, padded with pad_id after a shorter one
    scores: torch.Tensor  # (B,) float32: sum of generated log-probs / generated_len ** length_penalty
    lengths: torch.Tensor  # (B,) generated tokens of each best hypothesis (eos included)


def beam_search(
    model: Transformer,
    idx: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool = True,
    pad_id: int | None = None,
) -> BeamOutput:
    """Beam search from prompts idx (B, T0) (left-padded with `attention_mask` if their lengths differ).

    `pad_id` fills sequences shorter than the longest best one (default: eos_id, else 0). Runs the bare
    model in eval mode under inference mode, restoring its train/eval mode afterwards.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T0) with T0 >= 1, got {tuple(idx.shape)}")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"need num_beams >= 1 and max_new_tokens >= 1, got {num_beams}, {max_new_tokens}")
    mask = check_left_padding(attention_mask, idx)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    was_training = model.training
    model.eval()
    try:
        with decoding_mode(model):
            seqs, scores, lengths = _search(model, idx, mask, num_beams, max_new_tokens, eos_id, length_penalty,
                                            early_stopping, use_cache)
    finally:
        model.train(was_training)
    T0, n = idx.shape[1], max(lengths)
    out = torch.full((idx.shape[0], T0 + n), pad, dtype=torch.long, device=idx.device)
    out[:, :T0] = idx
    for b, s in enumerate(seqs):
        out[b, T0 : T0 + len(s)] = torch.tensor(s, dtype=torch.long)
    return BeamOutput(out, torch.tensor(scores, dtype=torch.float32), torch.tensor(lengths))


def _search(model, idx, mask, K, max_new, eos_id, lp, early_stopping, use_cache):  # noqa: ANN001, ANN202
    """The beam loop; returns per prompt (generated token list, score, length) of the best hypothesis."""
    B, T0 = idx.shape
    V, block = model.vocab_size, model.cfg.block_size
    limit = None if model.streaming else block
    dev = idx.device
    rows = idx.repeat_interleave(K, dim=0)  # (B*K, T0): beam i of prompt b is row b*K + i
    rmask = mask.repeat_interleave(K, dim=0) if mask is not None else None

    def window(seq, m):  # noqa: ANN001, ANN202
        if limit is None:
            return seq, m
        return seq[:, -limit:], (m[:, -limit:] if m is not None else None)

    ctx, cmask = window(rows, rmask)
    cache = make_cache(model, B * K, min(block, ctx.shape[1] + max_new), dev) if use_cache else None
    logits = model(ctx, kv_cache=cache, attn_mask=cmask)[:, -1, :V]  # (B*K, V)
    beam_scores = torch.zeros(B, K, dtype=torch.float32, device=dev)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: only beam 0 may expand at step 1
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    gen = rows[:, :0]  # (B*K, 0) generated tokens of each running beam

    for step in range(max_new):
        length = step + 1
        logp = F.log_softmax(upcast(logits).float(), dim=-1)  # (B*K, V)
        cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)  # (B, K*V)
        top_s, top_i = torch.topk(cand, min(2 * K, K * V), dim=1)  # (B, 2K)
        parent, tok = top_i // V, top_i % V
        next_parent = torch.zeros(B, K, dtype=torch.long)
        next_tok = torch.zeros(B, K, dtype=torch.long)
        next_score = torch.zeros(B, K, dtype=torch.float32)
        gen_list = gen.tolist()
        for b, (ss, ps, ts) in enumerate(zip(top_s.tolist(), parent.tolist(), tok.tolist())):
            if done[b]:  # keep the rows busy with something harmless; their results are never read
                next_tok[b] = 0 if eos_id is None else eos_id
                continue
            chosen = 0
            for j, (s, p, t) in enumerate(zip(ss, ps, ts)):
                if s == float("-inf"):
                    break
                if eos_id is not None and t == eos_id:
                    if j < K:  # an eos outside the best K would not have survived as a beam either
                        finished[b].append((s / length**lp, gen_list[b * K + p] + [t]))
                    continue
                next_parent[b, chosen], next_tok[b, chosen], next_score[b, chosen] = p, t, s
                chosen += 1
                if chosen == K:
                    break
            for i in range(chosen, K):  # fewer than K continuations (tiny vocab): dead beams
                next_score[b, i] = float("-inf")
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
            if len(finished[b]) == K:
                best_running = next_score[b, 0].item() / length**lp
                done[b] = early_stopping or finished[b][-1][0] >= best_running
        if all(done):
            break
        order = (torch.arange(B)[:, None] * K + next_parent).view(-1).to(dev)  # (B*K,) parent row of each beam
        tok_col = next_tok.view(-1, 1).to(dev)
        gen = torch.cat([gen.index_select(0, order), tok_col], dim=1)
        rows = torch.cat([rows.index_select(0, order), tok_col], dim=1)
        if rmask is not None:
            rmask = torch.cat([rmask.index_select(0, order), torch.ones_like(rmask[:, :1])], dim=1)
        beam_scores = next_score.to(dev)
        if step == max_new - 1:
            break
        if cache is not None and cache.length < cache.max_len:
            cache.reorder(order)
            logits = model(tok_col, kv_cache=cache)[:, -1, :V]
        else:
            cache = None  # the context is full: recompute the last block_size tokens (as generate does)
            ctx, cmask = window(rows, rmask)
            logits = model(ctx, attn_mask=cmask)[:, -1, :V]

    results = []
    gen_list, score_list = gen.tolist(), beam_scores.tolist()
    for b in range(B):
        hyps = list(finished[b])
        if not done[b]:
            L = len(gen_list[0])
            hyps += [(score_list[b][i] / L**lp, gen_list[b * K + i]) for i in range(K)
                     if score_list[b][i] != float("-inf")]
        score, tokens = max(hyps, key=lambda h: h[0])
        results.append((tokens, score, len(tokens)))
    return [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]
