"""GPT-2's BPE: the bundled files agree with each other and we encode exactly as GPT-2 / tiktoken do.

References: GPT-2's published vocab (openai/gpt-2 encoder.json = vocab.json here) gives "Hello" = 15496
and " world" = 995; the Tiny Shakespeare token counts are the ones nanoGPT's prepare.py reports
(301,966 train / 36,059 val tokens) and data/tinyshakespeare/README.md records.
"""

from __future__ import annotations

import json
import random

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tok_helpers import GPT2_DIR, random_codepoints, random_text

from llm_dist.tokenizer import GPT2_PATTERN, load_tokenizer, load_vocab_merges
from llm_dist.tokenizer.gpt2 import bytes_to_unicode, unicode_to_bytes
from llm_dist.tokenizer.reference import reference_encode_ordinary


def test_hello_world(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256


def test_load_tokenizer_gpt2_is_bundled_gpt2(gpt2):
    tok = load_tokenizer("gpt2")
    assert tok.name == "gpt2" and tok.fingerprint() == gpt2.fingerprint()


def test_vocab_json_ids_equal_tiktoken_ranks():
    vocab = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    ranks = load_tiktoken_bpe(str(GPT2_DIR / "gpt2.tiktoken"))  # tiktoken's own parser, as an independent reader
    assert len(vocab) == 50257 and len(ranks) == 50256
    for token, i in vocab.items():
        if token == "<|endoftext|>":
            assert i == 50256
            continue
        assert ranks[unicode_to_bytes(token, "vocab.json")] == i


def test_merge_k_produces_id_256_plus_k():
    vocab = json.loads((GPT2_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (GPT2_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    lines = [ln for ln in lines if ln]
    assert len(lines) == 50000
    for k, line in enumerate(lines):
        a, b = line.split(" ")
        assert vocab[a + b] == 256 + k, line


def test_bytes_to_unicode_is_a_bijection_onto_printables():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256)) and len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())
    assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ"  # the two stand-ins everyone sees in GPT-2 vocabularies


def test_vocab_merges_loader_equals_tiktoken_file_loader(gpt2):
    tok = load_vocab_merges(GPT2_DIR / "vocab.json", GPT2_DIR / "merges.txt")
    assert tok.mergeable_ranks == gpt2.mergeable_ranks
    assert tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.fingerprint() == gpt2.fingerprint()
    # The folder form of load_tokenizer takes the same route.
    assert load_tokenizer(str(GPT2_DIR)).fingerprint() == gpt2.fingerprint()
    assert load_tokenizer(str(GPT2_DIR / "gpt2.tiktoken")).fingerprint() == gpt2.fingerprint()


def test_tiny_shakespeare_split_and_token_counts(gpt2, shakespeare):
    assert len(shakespeare) == 1_115_394
    n = int(0.9 * len(shakespeare))
    train, val = shakespeare[:n], shakespeare[n:]
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert (len(gpt2.encode_ordinary(train)), len(gpt2.encode_ordinary(val))) == (301_966, 36_059)


def _texts(shakespeare: str) -> list[str]:
    rng = random.Random(1234)
    return [
        shakespeare[:20_000],
        random_text(rng, 3000),
        random_codepoints(rng, 2000),
        "  leading and trailing   \n\n\n  spaces\t\t\r\n \n",
        "numbers 1 12 123 1234 12345 3.14159 1e-9 0x1F ١٢٣٤ ½",
        "def f(x):\n    return x**2  # comment\n\n\nclass A:\n\tpass\n",
        "emoji 😀👍🏽👨‍👩‍👧🇩🇪 and CJK 你好世界 and combining e\u0301\u0301",
        "they're we've I'm it'll she'd DON'T 'S'",
    ]


def test_our_gpt2_equals_tiktokens_gpt2_encoding(gpt2, shakespeare):
    """tiktoken's own GPT-2 definition (its r50k pattern, possessive quantifiers) over the same ranks."""
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = load_tiktoken_bpe(str(GPT2_DIR / "gpt2.tiktoken"))
    ref = tiktoken.Encoding("gpt2-ref", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    for text in _texts(shakespeare):
        assert gpt2.encode_ordinary(text) == ref.encode_ordinary(text)


def test_gpt2_tiktoken_path_equals_reference_encoder(gpt2, shakespeare):
    for text in _texts(shakespeare):
        assert gpt2.encode_ordinary(text) == reference_encode_ordinary(text, GPT2_PATTERN, gpt2.mergeable_ranks)


def test_gpt2_encode_batch_equals_single(gpt2, shakespeare):
    texts = [shakespeare[i : i + 5000] for i in range(0, 100_000, 5000)] + [""]
    assert gpt2.encode_batch(texts) == [gpt2.encode_ordinary(t) for t in texts]


def test_gpt2_special_tokens(gpt2):
    s = "a<|endoftext|>b"
    assert gpt2.encode(s, allowed_special="all") == [64, 50256, 65]
    assert gpt2.encode(s, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    # Not allowed -> plain text, the base-class contract (never an error).
    assert 50256 not in gpt2.encode(s) and gpt2.decode(gpt2.encode(s)) == s
    with pytest.raises(ValueError, match="not special tokens"):
        gpt2.encode(s, allowed_special={"<|nope|>"})
