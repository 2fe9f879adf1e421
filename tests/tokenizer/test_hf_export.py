"""The Hugging Face tokenizer built from each project tokenizer encodes and decodes exactly as the project's:
random Unicode (emoji, CJK, combining marks, whitespace runs, control characters, all of Unicode),
strings decoded from random bytes, arbitrary id sequences (invalid UTF-8 included), and through
`AutoTokenizer.from_pretrained` on the written folder."""

from __future__ import annotations

import json
import random

import pytest

from llm_dist.tokenizer import ByteTokenizer, CL100K_PATTERN, GPT2_PATTERN, load_tokenizer
from llm_dist.tokenizer.hf_export import build_hf_tokenizer, merges_from_ranks, onig_pattern, save_hf_tokenizer
from tok_helpers import random_codepoints, random_text

pytest.importorskip("tokenizers")

WHICH = ["byte", "gpt2", "trained", "trained_cl100k"]


def _tok(which: str, request):  # noqa: ANN202
    return ByteTokenizer() if which == "byte" else request.getfixturevalue(which)


def _texts(seed: int, shakespeare: str) -> list[str]:
    rng = random.Random(seed)
    start = rng.randrange(len(shakespeare) - 400)
    return [
        random_text(rng, rng.randint(0, 120)),
        random_codepoints(rng, rng.randint(1, 40)),
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))).decode("utf-8", errors="replace"),
        " " * rng.randint(1, 9) + "\n" * rng.randint(0, 3) + "x" + " \t" * rng.randint(0, 4) + "1234567890"[:rng.randint(1, 10)],
        shakespeare[start:start + rng.randint(1, 400)],
    ]


@pytest.mark.parametrize("which", WHICH)
def test_ids_equal_on_random_unicode(which, request, shakespeare):
    tok = _tok(which, request)
    hf = build_hf_tokenizer(tok)
    for seed in range(150):
        texts = _texts(seed, shakespeare)
        got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        want = [tok.encode_ordinary(t) for t in texts]
        for t, g, w in zip(texts, got, want):
            assert g == w, (seed, t)


@pytest.mark.parametrize("which", WHICH)
def test_decode_equals_on_arbitrary_ids_incl_invalid_utf8(which, request):
    tok = _tok(which, request)
    hf = build_hf_tokenizer(tok)
    rng = random.Random(1)
    singles = [i for i in range(256)]  # lone continuation / lead bytes make invalid UTF-8 often
    invalid = 0
    for _ in range(400):
        pool = singles if rng.random() < 0.5 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 24))]
        raw = tok.decode_bytes(ids)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            invalid += 1
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids), ids
    assert invalid > 100  # the test did exercise the replacement path


def test_specials_keep_their_ids_and_split_text(trained_cl100k):
    tok = trained_cl100k
    hf = build_hf_tokenizer(tok)
    assert {s: hf.token_to_id(s) for s in tok.special_tokens} == tok.special_tokens
    text = "a<|pad|>b <|endoftext|>\n<|endoftext|>"
    assert hf.encode(text).ids == tok.encode(text, allowed_special="all")


def test_possessive_interval_is_made_atomic_for_oniguruma():
    assert onig_pattern(GPT2_PATTERN) == GPT2_PATTERN
    assert r"(?>\p{N}{1,3})" in onig_pattern(CL100K_PATTERN) and r"\p{N}{1,3}+" not in onig_pattern(CL100K_PATTERN)
    assert onig_pattern(r"[a-z]{2,}+|\{1}+") == r"(?>[a-z]{2,})|\{1}+"  # an escaped brace is no interval
    with pytest.raises(ValueError, match="atomic group"):
        onig_pattern(r"(ab){2}+")


def test_merges_are_every_split_ordered_by_result_rank():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"bc": 257, b"abc": 258}
    assert merges_from_ranks(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"a", b"bc"), (b"ab", b"c")]


@pytest.mark.parametrize("which", ["byte", "gpt2", "trained_cl100k"])
def test_auto_tokenizer_loads_the_folder(which, request, tmp_path, shakespeare):
    transformers = pytest.importorskip("transformers")
    tok = _tok(which, request)
    save_hf_tokenizer(tok, tmp_path, model_max_length=128)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("hello world")["input_ids"] == tok.encode_ordinary("hello world") != []
    assert (hf.bos_token, hf.eos_token, hf.eos_token_id, hf.model_max_length) == (
        "<|endoftext|>", "<|endoftext|>", tok.eot_id, 128)
    for seed in range(20):
        for t in _texts(seed, shakespeare):
            ids = hf(t)["input_ids"]
            assert ids == tok.encode_ordinary(t), t
            assert hf.decode(ids) == tok.decode(ids)
    assert len(hf) == tok.vocab_size


def test_loads_a_saved_trained_tokenizer_file_too(tmp_path, trained):
    # The path a checkpoint's stored BPE takes: saved, reloaded, converted.
    trained.save(tmp_path / "tok.json")
    tok = load_tokenizer(tmp_path / "tok.json")
    assert build_hf_tokenizer(tok).encode("To be, or not").ids == trained.encode_ordinary("To be, or not")
