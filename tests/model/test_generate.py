"""KV cache and generation: cached vs recomputed logits and tokens, eos handling, and the sampling filters
against a naive sort-and-loop implementation."""

from __future__ import annotations

import math

import pytest
import torch

from llm_dist.model.generate import KVCache, filter_logits, generate, sample_next, sampling_probs
from llm_dist.model.transformer import Transformer, build_model

from tiny_config import tiny

CASES = [(kv, pos) for kv in (4, 2, 1) for pos in ("rope", "learned")]  # MHA, GQA, MQA x positions


def _model(n_kv_head: int, pos_emb: str, **kw) -> Transformer:
    # A larger init std than GPT-2's makes the tiny model's next-token distributions peaked and varied,
    # so greedy ties (which float rounding could break differently) do not occur.
    return build_model(tiny(n_kv_head=n_kv_head, pos_emb=pos_emb, init_std=0.2, **kw), "cpu", seed=1).eval()


@pytest.mark.parametrize("n_kv_head,pos_emb", CASES)
def test_cached_logits_equal_full_recomputation(n_kv_head, pos_emb):
    model = _model(n_kv_head, pos_emb)
    idx = torch.randint(0, 61, (2, 20))
    full = model(idx)
    cache = KVCache.for_model(model, batch=2, max_len=20)
    assert cache.k.shape == (2, 2, n_kv_head, 20, 8)  # only the KV heads are stored
    chunks = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:10], kv_cache=cache)]  # prefill + a chunk
    chunks += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(10, 20)]  # one token at a time
    assert cache.length == cache.pos == 20
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size|overflow"):
        model(idx[:, :1], kv_cache=cache)


@pytest.mark.parametrize("n_kv_head,pos_emb", CASES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 10, 0.9)])
def test_generation_with_and_without_cache_agree(n_kv_head, pos_emb, temperature, top_k, top_p):
    model = _model(n_kv_head, pos_emb)
    prompt = torch.randint(0, 61, (3, 5))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(1234)
        outs.append(generate(model, prompt, 20, temperature, top_k, top_p, use_cache=use_cache, generator=g))
    assert outs[0].shape == (3, 25) and outs[0].dtype == torch.long
    assert torch.equal(outs[0][:, :5], prompt)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_generation_past_block_size_slides(pos_emb):
    # block_size 16: a 6-token prompt + 20 new tokens forces the cache -> sliding-window fallback, and a
    # 20-token prompt is cropped to its last 16 tokens. Greedy and sampled must match the no-cache path.
    model = _model(2, pos_emb, block_size=16)
    for T0 in (6, 20):
        prompt = torch.randint(0, 61, (2, T0))
        for temperature in (0.0, 1.0):
            a = generate(model, prompt, 20, temperature, use_cache=True, generator=torch.Generator().manual_seed(0))
            b = generate(model, prompt, 20, temperature, use_cache=False, generator=torch.Generator().manual_seed(0))
            assert a.shape == (2, T0 + 20) and torch.equal(a, b)
            # The sliding window really is the last block_size tokens: recompute the final step by hand.
            if temperature == 0.0:
                last = model(a[:, -17:-1])[:, -1, :61].argmax(-1)
                assert torch.equal(a[:, -1], last)


def test_eos_stops_each_sequence():
    model = _model(2, "rope")
    prompt = torch.randint(0, 61, (3, 4))
    ref = generate(model, prompt, 12, temperature=0.0)[:, 4:]  # (3, 12) greedy, no eos
    eos = int(ref[0, 2])
    out = generate(model, prompt, 12, temperature=0.0, eos_id=eos)[:, 4:]
    first = [(row == eos).nonzero()[0].item() if (row == eos).any() else None for row in ref]
    n = 12 if None in first else max(first) + 1  # the loop ends once every row has emitted eos
    assert out.shape == (3, n)
    for r in range(3):
        if first[r] is None:
            assert torch.equal(out[r], ref[r, :n])
        else:  # identical up to its first eos, eos afterwards
            assert torch.equal(out[r, : first[r] + 1], ref[r, : first[r] + 1])
            assert (out[r, first[r]:] == eos).all()
    # All rows the same prompt: all finish together, well before max_new_tokens.
    same = prompt[:1].expand(3, -1)
    out = generate(model, same, 12, temperature=0.0, eos_id=eos)
    assert out.shape == (3, 4 + first[0] + 1) and (out[:, -1] == eos).all()


def test_padded_vocab_is_never_generated():
    model = build_model(tiny(tie_embeddings=False), "cpu", seed=0).eval()
    with torch.no_grad():  # every hidden state becomes the constant 1-vector; padded columns then win by far
        model.norm_f.weight.zero_()
        model.norm_f.bias.fill_(1.0)
        model.lm_head.weight[61:] = 1.0
    assert model(torch.zeros(1, 1, dtype=torch.long))[0, -1].argmax() >= 61  # the trap is armed
    prompt = torch.randint(0, 61, (4, 3))
    for temperature in (0.0, 1.0):
        out = generate(model, prompt, 10, temperature, generator=torch.Generator().manual_seed(0))
        assert out.max() < 61


def test_generate_restores_training_mode_and_disables_dropout():
    model = build_model(tiny(dropout=0.5, init_std=0.2), "cpu", seed=0).train()
    prompt = torch.randint(0, 61, (2, 3))
    a = generate(model, prompt, 8, temperature=0.0)
    b = generate(model, prompt, 8, temperature=0.0, use_cache=False)
    assert model.training and torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ sampling

def naive_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Row by row in float64 with Python loops: temperature, keep >= k-th largest, then the nucleus."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for r, row in enumerate(logits.double().tolist()):
        row = [x / temperature for x in row]
        order = sorted(range(len(row)), key=lambda i: -row[i])
        keep = order if not 0 < top_k < len(row) else [i for i in order if row[i] >= row[order[top_k - 1]]]
        z = sum(math.exp(row[i]) for i in keep)
        nucleus, mass = [], 0.0
        for i in keep:
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += math.exp(row[i]) / z
        z = sum(math.exp(row[i]) for i in nucleus)
        for i in nucleus:
            out[r, i] = math.exp(row[i]) / z
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.5), (1.3, 8, 0.8), (1.0, 100, 0.95), (0.5, 1, 1.0),
])
def test_sampling_probs_match_naive(temperature, top_k, top_p):
    logits = 2.0 * torch.randn(4, 50, dtype=torch.float64)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probs, naive_probs(logits, temperature, top_k, top_p), atol=1e-12, rtol=1e-10)
    # float32 input gives the same distribution to float32 precision.
    torch.testing.assert_close(sampling_probs(logits.float(), temperature, top_k, top_p).double(),
                               naive_probs(logits, temperature, top_k, top_p), atol=1e-6, rtol=1e-5)


def test_filter_logits_keeps_top_k_ties_and_checks_arguments():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 0.0]])
    kept = filter_logits(logits, top_k=1).isfinite()
    assert kept.tolist() == [[True, False, True, False, False]]  # both maxima tie at the k-th value
    with pytest.raises(ValueError):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError):
        filter_logits(logits, top_k=-1)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.6), (6, 0.7)])
def test_sample_next_draws_from_the_filtered_support(top_k, top_p):
    n, V = 20000, 12
    base = torch.randn(1, V)
    probs = naive_probs(base, 1.0, top_k, top_p)[0]
    draws = sample_next(base.expand(n, -1), 1.0, top_k, top_p, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (n,) and draws.dtype == torch.long
    counts = torch.bincount(draws, minlength=V).double()
    assert (counts[probs == 0] == 0).all()  # nothing outside the support, ever
    assert (counts[probs > 0.01] > 0).all()  # everything reasonably likely inside it appears
    freq = counts / n
    assert ((freq - probs).abs() <= 5 * torch.sqrt(probs * (1 - probs) / n) + 1e-12).all()


def test_greedy_is_argmax_and_generator_is_reproducible():
    logits = torch.randn(5, 30)
    assert torch.equal(sample_next(logits, temperature=0.0, top_k=3, top_p=0.1), logits.argmax(-1))
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(9))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        sampling_probs(logits, temperature=0.0)


def test_generated_tokens_can_feed_a_training_forward():
    # Rollouts (RL) go back through the model with autograd on: the result must not be an inference tensor.
    model = build_model(tiny(), "cpu", seed=0)
    out = generate(model, torch.randint(0, 61, (2, 3)), 5, temperature=1.0)
    assert not out.is_inference()
    model(out).sum().backward()
    assert model.tok_emb.weight.grad is not None
