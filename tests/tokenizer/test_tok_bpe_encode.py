"""Encoding with trained BPEs: tiktoken path == pure-Python reference, round trips on arbitrary Unicode,
special tokens, batch encoding, and the documented behaviour for invalid UTF-8 and lone surrogates."""

from __future__ import annotations

import random

import pytest
from tok_helpers import POOLS, random_codepoints, random_text

from llm_dist.tokenizer.reference import reference_decode_bytes, reference_encode, reference_encode_ordinary


def _varied_texts(shakespeare: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        shakespeare[500_000:530_000],
        random_text(rng, 4000),
        random_codepoints(rng, 1500),
        random_text(rng, 2000, ("emoji", "combining", "cjk")),
        " \t\n" * 50 + "x" + "\n\n\n   \r\n" * 20,  # whitespace runs, both line-ending styles
        "0 00 000 0000 12345678901234567890 3.14 -7e10 ٣٤٥ ①②③",
        'for i in range(10):\n    print(f"{i:>4}")  # loop\n\treturn {"k": [1, 2]}\n',
        "I'll've we'RE y'all O'Neil '''quoted'''",
        "",
    ]


@pytest.mark.parametrize("which,seed", [("trained", 1), ("trained_cl100k", 2)])
def test_tiktoken_path_equals_reference_encoder(which, seed, request, shakespeare):
    tok = request.getfixturevalue(which)
    for text in _varied_texts(shakespeare, seed):
        assert tok.encode_ordinary(text) == reference_encode_ordinary(text, tok.pattern, tok.mergeable_ranks)


@pytest.mark.parametrize("which", ["trained", "trained_cl100k", "gpt2"])
def test_round_trip_random_unicode(which, request):
    tok = request.getfixturevalue(which)
    rng = random.Random(42)
    for _ in range(40):
        text = random_text(rng, rng.randint(0, 400)) + random_codepoints(rng, rng.randint(0, 50))
        ids = tok.encode_ordinary(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_compression_is_real(trained, shakespeare):
    """A 1024-id BPE trained on Shakespeare must compress it far beyond 1 byte/token (we measure ~2.3;
    GPT-2's 50k vocabulary gets ~3.3), and must beat every prefix of itself: fewer merges, longer output."""
    text = shakespeare[-100_000:]
    n = len(trained.encode_ordinary(text))
    assert len(text.encode()) / n > 2.0
    fewer = {tok: r for tok, r in trained.mergeable_ranks.items() if r < 512}
    assert len(reference_encode_ordinary(text[:20_000], trained.pattern, fewer)) > len(trained.encode_ordinary(text[:20_000]))


def test_special_tokens(trained_cl100k):
    tok = trained_cl100k
    eot, pad = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|pad|>"]
    assert {eot, pad} == {tok.vocab_size - 2, tok.vocab_size - 1}
    text = "doc one<|endoftext|>doc two<|pad|><|pad|>"
    assert tok.encode(text, allowed_special="all").count(pad) == 2
    only_eot = tok.encode(text, allowed_special={"<|endoftext|>"})
    assert eot in only_eot and pad not in only_eot
    ordinary = tok.encode_ordinary(text)
    assert eot not in ordinary and pad not in ordinary
    for allowed in ("all", {"<|endoftext|>"}, "none"):
        ids = tok.encode(text, allowed_special=allowed)
        want = reference_encode(text, tok.pattern, tok.mergeable_ranks, tok.special_tokens,
                                tok.special_tokens if allowed == "all" else ({"<|endoftext|>"} if allowed != "none" else ()))
        assert ids == want
        assert tok.decode(ids) == text
        assert reference_decode_bytes(ids, tok.mergeable_ranks, tok.special_tokens) == text.encode()


def test_encode_batch_equals_encode_ordinary(trained, shakespeare):
    texts = [shakespeare[i : i + 3000] for i in range(0, 90_000, 3000)] + ["", "<|endoftext|>"]
    assert trained.encode_batch(texts) == [trained.encode_ordinary(t) for t in texts]


def test_invalid_utf8_decodes_with_replacement_and_exact_bytes(gpt2):
    ids = gpt2.encode_ordinary("é😀")
    # Cut the emoji's 4 bytes: decode_bytes gives exactly the bytes, decode replaces the broken tail.
    byte_ids = [gpt2.mergeable_ranks[bytes([b])] for b in "é😀".encode()[:4]]
    assert gpt2.decode_bytes(byte_ids) == "é😀".encode()[:4]
    assert gpt2.decode(byte_ids) == "é\ufffd"
    assert gpt2.decode(ids) == "é😀"


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_lone_surrogates_become_replacement_char(which, request):
    tok = request.getfixturevalue(which)
    text = "a\ud800b\udfffc"
    assert tok.decode(tok.encode_ordinary(text)) == "a\ufffdb\ufffdc"
    assert tok.encode_ordinary(text) == reference_encode_ordinary(text, tok.pattern, tok.mergeable_ranks)
    # A well-formed surrogate *pair* in a Python str is joined into its character, as tiktoken does.
    assert tok.decode(tok.encode_ordinary("\ud83d\ude00")) == "😀"


def test_unknown_id_is_a_clear_error(trained):
    for bad in (trained.vocab_size, -1, 10**12):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            trained.decode([1, bad])


def test_numpy_and_torch_ids_decode(trained):
    np = pytest.importorskip("numpy")
    ids = trained.encode_ordinary("To be, or not to be")
    assert trained.decode(np.array(ids, dtype=np.uint16)) == "To be, or not to be"
    torch = pytest.importorskip("torch")
    assert trained.decode(torch.tensor(ids)) == "To be, or not to be"


def test_pools_cover_multibyte_and_astral():
    # Guard for the generators above: they must really produce 2-, 3- and 4-byte UTF-8 and controls.
    lengths = {len(c.encode()) for pool in POOLS.values() for piece in pool for c in piece}
    assert {1, 2, 3, 4} <= lengths
    assert any(ord(c) < 32 for c in POOLS["control"])
