"""BPE training: the incremental trainer equals a naive full-recount trainer, pre-tokenization is
independent of process count and chunking, and without ties we learn the same merges as HF tokenizers.

Reference for the algorithm: Sennrich et al. 2016 (BPE for NMT), Radford et al. 2019 (byte-level, GPT-2).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from tok_helpers import random_text

from llm_dist.tokenizer import CL100K_PATTERN, GPT2_PATTERN, learn_merges, train_bpe
from llm_dist.tokenizer.gpt2 import unicode_to_bytes
from llm_dist.tokenizer.pretokenize import count_words, count_words_parallel, iter_chunks, safe_cut_points


def naive_learn_merges(word_counts: dict[str, int], num_merges: int, stop_at_tie: bool = False):
    """Textbook BPE: recount every pair over every word after each merge. Same tie-break and duplicate rule
    as the trainer under test (documented in bpe_train.py): max count, then smallest (left id, right id);
    a result whose bytes already exist reuses that id. Also reports whether each step was a tie."""
    words = [(list(w.encode("utf-8")), c) for w, c in word_counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    merges, counts, ties = [], [], []
    while len(vocab) - 256 < num_merges:
        pairs: Counter = Counter()
        for w, c in words:
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        ties.append(sum(1 for c in pairs.values() if c == pairs[best]) > 1)
        if stop_at_tie and ties[-1]:
            break
        new = vocab[best[0]] + vocab[best[1]]
        if new in vocab:
            new_id = vocab.index(new)
        else:
            new_id = len(vocab)
            vocab.append(new)
        merges.append((best[0], best[1], new_id))
        counts.append(pairs[best])
        for k, (w, c) in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = (out, c)
    return vocab, merges, counts, ties


def test_incremental_equals_naive_on_shakespeare(shakespeare):
    wc = count_words(shakespeare[:50_000], GPT2_PATTERN)
    got = learn_merges(wc, 300)
    want = naive_learn_merges(wc, 300)[:3]
    assert got == want


def test_incremental_equals_naive_with_heavy_ties():
    """Random words over 2-3 letters with small counts, trained until no pair is left: nearly every step is a
    tie, so this pins down the tie-break rule and the lazy heap/index bookkeeping until exhaustion."""
    rng = random.Random(7)
    for trial in range(6):
        alphabet = "ab" if trial % 2 else "abc"
        wc = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16))): rng.randint(1, 5) for _ in range(80)}
        got = learn_merges(wc, 10_000)
        vocab, merges, counts, ties = naive_learn_merges(wc, 10_000)
        assert got == (vocab, merges, counts)
        assert sum(ties) > len(ties) // 2
        # Trained to exhaustion: every distinct word is now a single token.
        assert {w.encode() for w in wc if len(w) > 1} <= set(vocab)


def test_incremental_equals_naive_on_unicode():
    wc = count_words(random_text(random.Random(3), 4000), CL100K_PATTERN)
    assert learn_merges(wc, 200) == naive_learn_merges(wc, 200)[:3]


def test_merge_ids_and_vocab_size(shakespeare):
    res = train_bpe([shakespeare[:200_000]], 600, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False)
    tok = res.to_tokenizer()
    assert tok.vocab_size == 600
    assert res.special_tokens == {"<|endoftext|>": 598, "<|pad|>": 599}
    # Without duplicate results, merge k produces id 256 + k, like GPT-2's merges.txt.
    assert [m[2] for m in res.merges] == list(range(256, 256 + len(res.merges)))
    assert all(res.vocab[c] == res.vocab[a] + res.vocab[b] for a, b, c in res.merges)
    # Counts never increase: a later merge could otherwise have been chosen earlier.
    assert all(x >= y for x, y in zip(res.merge_counts, res.merge_counts[1:]))


def test_specials_in_training_text_are_never_merged():
    text = "<|endoftext|>hello<|endoftext|>" * 200
    res = train_bpe([text], 300, progress=False)
    assert not any(b"<|" in tok or b"|>" in tok for tok in res.vocab)
    tok = res.to_tokenizer()
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(tok.eot_id) == 400 and tok.decode(ids) == text


def test_vocab_size_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe(["abc"], 100, progress=False)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, CL100K_PATTERN])
def test_chunked_pretokenization_equals_whole(pattern, shakespeare):
    """Cutting at safe line breaks must not change a single pre-token (in-process, many tiny chunks)."""
    rng = random.Random(11)
    texts = [shakespeare[:30_000]] + [random_text(rng, 800, ("ascii", "space", "words", "digits", "emoji")) for _ in range(30)]
    for text in texts:
        chunks = list(iter_chunks([text], ["<|endoftext|>"], chunk_chars=37))
        assert "".join(chunks) == text.replace("<|endoftext|>", "")
        chunked: Counter = Counter()
        for c in chunks:
            chunked.update(count_words(c, pattern))
        assert chunked == count_words(text, pattern, ["<|endoftext|>"])
    assert len(safe_cut_points(shakespeare[:30_000], 37)) > 100  # Shakespeare really was cut


def test_parallel_pretokenization_equals_single_process(shakespeare):
    docs = [shakespeare[:400_000], shakespeare[400_000:] + "<|endoftext|>" + random_text(random.Random(5), 5000)]
    single = count_words_parallel(docs, "gpt2", ["<|endoftext|>"], num_proc=1, progress=False)
    multi = count_words_parallel(docs, "gpt2", ["<|endoftext|>"], num_proc=2, chunk_chars=50_000, progress=False)
    assert multi == single
    whole = Counter()
    for d in docs:
        whole.update(count_words(d, "gpt2", ["<|endoftext|>"]))
    assert single == whole


def _hf_train(text: str, vocab_size: int) -> list[tuple[bytes, bytes]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    import json

    merges = json.loads(tok.to_str())["model"]["merges"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    return [(unicode_to_bytes(a, "hf"), unicode_to_bytes(b, "hf")) for a, b in pairs]


def test_same_merges_as_hf_tokenizers_until_the_first_tie(shakespeare):
    """HF breaks ties by its own ids (bytes ordered by their GPT-2 unicode stand-ins), so only the merges
    before the first tie are determined by the data alone; those must agree exactly."""
    pytest.importorskip("tokenizers")
    text = shakespeare[:300_000]
    wc = count_words(text, GPT2_PATTERN)
    vocab, merges, _, ties = naive_learn_merges(wc, 120, stop_at_tie=True)
    first_tie = ties.index(True) if True in ties else len(ties)
    assert first_tie >= 50, "corpus too tie-prone for a meaningful comparison"
    ours = [(vocab[a], vocab[b]) for a, b, _ in merges[:first_tie]]
    assert learn_merges(wc, first_tie)[1] == merges[:first_tie]
    hf = _hf_train(text, 256 + 1 + 400)
    assert hf[:first_tie] == ours
