"""Rolling KV cache (constant memory past the context), left-padded batches, repetition penalty, seeds and
beam search, each against recomputation or a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from llm_dist.config import AttnConfig
from llm_dist.model.beam import beam_search
from llm_dist.model.generate import apply_repetition_penalty, generate
from llm_dist.model.kv_cache import KVCache, RollingKVCache
from llm_dist.model.transformer import Transformer, build_model

from tiny_config import tiny


def _model(**kw) -> Transformer:
    # init_std 0.2: peaked, varied next-token distributions, so greedy never meets a rounding-level tie.
    return build_model(tiny(init_std=0.2, **kw), "cpu", seed=1).eval()


STREAMING = [(dict(window=6, sinks=0), 4), (dict(window=6, sinks=2), 2), (dict(window=1, sinks=3), 1)]


@pytest.mark.parametrize("attn,n_kv_head", STREAMING)
def test_rolling_cache_logits_equal_full_recomputation_far_past_the_context(attn, n_kv_head):
    model = _model(pos_emb="rope", n_kv_head=n_kv_head, attn=AttnConfig(**attn))
    assert model.streaming
    T = 10 * model.cfg.block_size  # 320 positions, block_size 32, cache of window + sinks slots
    idx = torch.randint(0, 61, (2, T))
    with torch.no_grad():
        full = model(idx)  # the reference: the whole sequence at once with the explicit window mask
        cache = RollingKVCache.for_model(model, batch=2)
        k_ptr, nbytes = cache.k.data_ptr(), cache.nbytes()
        chunks = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:20], kv_cache=cache)]  # chunks > window
        for t in range(20, T):
            chunks.append(model(idx[:, t : t + 1], kv_cache=cache))
            assert cache.k.data_ptr() == k_ptr and cache.nbytes() == nbytes  # no growth, no reallocation
    assert cache.k.shape[3] == attn["window"] + attn["sinks"] + 1  # slots (+ the trash slot) only
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_streaming_generation_matches_no_cache_for_10x_the_context(temperature):
    model = _model(pos_emb="rope", n_kv_head=2, attn=AttnConfig(window=8, sinks=2))
    prompt = torch.randint(0, 61, (3, 5))
    n = 10 * model.cfg.block_size
    a = generate(model, prompt, n, temperature, seed=7)
    b = generate(model, prompt, n, temperature, use_cache=False, seed=7)
    assert a.shape == (3, 5 + n) and torch.equal(a, b)


def _left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return idx, mask


@pytest.mark.parametrize("kw", [
    dict(pos_emb="rope", n_kv_head=2), dict(pos_emb="learned"), dict(pos_emb="sinusoidal", n_kv_head=1),
    dict(pos_emb="rope", attn=AttnConfig(window=5, sinks=1)), dict(pos_emb="none", attn=AttnConfig(window=4)),
    dict(pos_emb="rope", attn=AttnConfig(window=4, pattern="local,global")),
])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(kw):
    model = _model(**kw)
    prompts = [torch.randint(0, 61, (n,)) for n in (7, 2, 5)]
    idx, mask = _left_pad(prompts, pad=13)
    new = 40  # past block_size 32 for the non-streaming models: exercises the recompute fallback with padding
    for use_cache in (True, False):
        out = generate(model, idx, new, temperature=0.0, attention_mask=mask, use_cache=use_cache)
        for i, p in enumerate(prompts):
            alone = generate(model, p[None], new, temperature=0.0)[0]
            assert torch.equal(out[i, idx.shape[1] - len(p):], alone), (use_cache, i)


def test_left_padding_validation():
    model = _model()
    idx = torch.randint(0, 61, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        generate(model, idx, 2, attention_mask=torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="shape"):
        generate(model, idx, 2, attention_mask=torch.ones(2, 3))


def test_repetition_penalty_matches_naive_and_cache():
    logits = torch.randn(3, 11, dtype=torch.float64)
    seen = torch.rand(3, 11) < 0.4
    out = apply_repetition_penalty(logits, seen, 1.7)
    for b in range(3):
        for t in range(11):
            x = logits[b, t].item()
            want = (x / 1.7 if x > 0 else x * 1.7) if seen[b, t] else x
            assert out[b, t].item() == pytest.approx(want, rel=1e-15)
    model = _model(pos_emb="rope")
    prompt = torch.randint(0, 61, (2, 4))
    plain = generate(model, prompt, 25, temperature=0.0)
    a = generate(model, prompt, 25, temperature=0.0, repetition_penalty=3.0)
    b = generate(model, prompt, 25, temperature=0.0, repetition_penalty=3.0, use_cache=False)
    assert torch.equal(a, b) and not torch.equal(a, plain)
    # Greedy with the penalty, one step at a time by hand: penalise what the row holds, take the argmax.
    seq = prompt.clone()
    for _ in range(25):
        logits = model(seq)[:, -1, :61]
        seen = torch.zeros(2, 61, dtype=torch.bool).scatter(1, seq, True)
        seq = torch.cat([seq, apply_repetition_penalty(logits, seen, 3.0).argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, a)


def test_seed_reproduces_and_differs():
    model = _model(pos_emb="rope")
    prompt = torch.randint(0, 61, (4, 3))
    a = generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=11)
    b = generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=11)
    c = generate(model, prompt, 20, temperature=1.0, top_p=0.9, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_reorder_follows_rows():
    model = _model(pos_emb="rope")
    idx = torch.randint(0, 61, (3, 6))
    cache = KVCache.for_model(model, 3, 10)
    model(idx, kv_cache=cache)
    cache.reorder(torch.tensor([2, 2, 0]))
    nxt = torch.randint(0, 61, (3, 1))
    got = model(nxt, kv_cache=cache)[:, -1]
    want = model(torch.cat([idx[[2, 2, 0]], nxt], 1))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- beam search


def test_one_beam_is_greedy():
    model = _model(pos_emb="rope")
    prompt = torch.randint(0, 61, (2, 5))
    assert torch.equal(beam_search(model, prompt, 1, 12).sequences, generate(model, prompt, 12, temperature=0.0))


def test_full_width_beams_find_the_exact_best_two_token_continuation():
    # num_beams = V keeps every first token, so after two steps beam search is exhaustive search.
    model = _model(pos_emb="learned")
    prompt = torch.randint(0, 61, (1, 5))
    res = beam_search(model, prompt, num_beams=61, max_new_tokens=2, length_penalty=1.0)
    with torch.no_grad():
        pairs = torch.cartesian_prod(torch.arange(61), torch.arange(61))  # (3721, 2) every continuation
        seqs = torch.cat([prompt.expand(len(pairs), -1), pairs], dim=1)
        logp = torch.log_softmax(model(seqs)[:, :, :61].double(), dim=-1)
        total = logp[:, 4].gather(1, pairs[:, :1])[:, 0] + logp[:, 5].gather(1, pairs[:, 1:])[:, 0]
    best = int(total.argmax())
    assert torch.equal(res.sequences[0], seqs[best])
    assert res.scores[0].item() == pytest.approx(total[best].item() / 2, abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, -1.0])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_scores_are_the_normalised_log_probs_and_cache_agrees(length_penalty, early_stopping):
    model = _model(pos_emb="rope", n_kv_head=2)
    prompt = torch.randint(0, 61, (3, 5))
    eos = int(generate(model, prompt, 6, temperature=0.0)[0, -2])  # a token greedy decoding does emit
    kw = dict(eos_id=eos, length_penalty=length_penalty, early_stopping=early_stopping)
    res = beam_search(model, prompt, 4, 12, **kw)
    assert torch.equal(res.sequences, beam_search(model, prompt, 4, 12, use_cache=False, **kw).sequences)
    with torch.no_grad():
        for b in range(3):
            n = int(res.lengths[b])
            seq = res.sequences[b, : 5 + n]
            assert eos not in seq[5:-1].tolist()  # nothing after an eos but padding
            logp = torch.log_softmax(model(seq[None])[0, 4:-1, :61].double(), dim=-1)
            total = logp.gather(1, seq[5:, None]).sum().item()
            assert res.scores[b].item() == pytest.approx(total / n**length_penalty, abs=1e-4)


def test_left_padded_beam_search_equals_each_prompt_alone():
    model = _model(pos_emb="rope")
    prompts = [torch.randint(0, 61, (n,)) for n in (6, 3)]
    idx, mask = _left_pad(prompts)
    res = beam_search(model, idx, 3, 8, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = beam_search(model, p[None], 3, 8)
        assert torch.equal(res.sequences[i, idx.shape[1] - len(p):], alone.sequences[0])
