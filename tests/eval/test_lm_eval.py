"""Loss / perplexity / bits per byte against a float64 hand computation, for a byte and a BPE tokenizer.

The evaluation computes its log-softmax in fp32 (as training does), hence FP32_TOL against float64."""

from __future__ import annotations

import math

import torch

from llm_dist.config import ModelConfig
from llm_dist.eval.lm import evaluate_lm, token_byte_lengths
from llm_dist.model.transformer import build_model
from llm_dist.tokenizer import load_tokenizer

FP32_TOL = 1e-5  # |fp32 - fp64| of a mean NLL of ~5.5 nats over a few hundred tokens (seen: 2e-8)
TEXT = "ROMEO:\nBut soft! what light through yonder window breaks? Café, naïve — “quoted” 日本語.\n"


def tiny_model(vocab: int, block: int = 64) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)
    return build_model(cfg, "cpu", seed=0).double()


def reference_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-target NLL in float64 through an explicit log-softmax (no F.cross_entropy)."""
    with torch.no_grad():
        logits = model(x).double()  # (B, T, V)
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)


def windows(ids: list[int], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (x, y) windows of length T over ids (the tail that does not fill one is dropped)."""
    n = (len(ids) - 1) // T
    t = torch.tensor(ids[: n * T + 1])
    return t[:-1].view(n, T), t[1:].view(n, T)


def test_byte_tokenizer_bpb_is_loss_over_ln2() -> None:
    tok = load_tokenizer("byte")
    ids = tok.encode_ordinary(TEXT * 3)
    model = tiny_model(tok.vocab_size)
    x, y = windows(ids, 32)
    res = evaluate_lm(model, [[(x, y)]], token_byte_lengths(tok, model.padded_vocab_size))
    nll = reference_nll(model, x, y)
    assert res.tokens == y.numel() == res.bytes  # one byte per token
    assert abs(res.loss - nll.mean().item()) < FP32_TOL
    assert abs(res.bpb - res.loss / math.log(2)) < 1e-12
    assert abs(res.ppl - math.exp(res.loss)) < 1e-9 * res.ppl


def test_gpt2_bpb_matches_hand_computation_over_the_text_bytes() -> None:
    tok = load_tokenizer("gpt2")
    ids = tok.encode_ordinary(TEXT)
    model = tiny_model(tok.vocab_size, block=len(ids))
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    # Hand computation: the targets are every token but the first, so they stand for the text minus the
    # first token's bytes; multi-byte characters (é, —, 日本語) are split across BPE tokens.
    target_bytes = len(TEXT.encode("utf-8")) - len(tok.decode_bytes(ids[:1]))
    assert target_bytes > len(ids) - 1  # BPE: more bytes than tokens
    expected = reference_nll(model, x, y).sum().item() / (math.log(2) * target_bytes)
    res = evaluate_lm(model, [[(x, y)]], token_byte_lengths(tok, model.padded_vocab_size))
    assert res.bytes == target_bytes
    assert abs(res.bpb - expected) < FP32_TOL


def test_ignored_targets_are_not_counted() -> None:
    tok = load_tokenizer("byte")
    model = tiny_model(tok.vocab_size)
    x, y = windows(tok.encode_ordinary(TEXT * 2), 16)
    y_masked = y.clone()
    y_masked[:, :5] = -100
    res = evaluate_lm(model, [[(x, y_masked)]], token_byte_lengths(tok, model.padded_vocab_size))
    nll = reference_nll(model, x, y)[:, 5:]
    assert res.tokens == nll.numel() == res.bytes
    assert abs(res.loss - nll.mean().item()) < FP32_TOL


def test_token_byte_lengths_sum_to_the_decoded_text() -> None:
    tok = load_tokenizer("gpt2")
    lengths = token_byte_lengths(tok, 50304)
    ids = tok.encode_ordinary(TEXT)
    assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))
    assert int(lengths[tok.vocab_size:].sum()) == 0  # padding ids stand for nothing
