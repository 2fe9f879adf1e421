"""Saving and loading tokenizers: round trips are exact, and every bad file gives one line naming the file
and what was expected (format: docs/tokenizer.md)."""

from __future__ import annotations

import base64
import json
import random

import pytest
from tok_helpers import random_text

from llm_dist.tokenizer import TokenizerFileError, load_bpe_file, load_tiktoken_file, load_tokenizer


def test_save_load_round_trip(trained_cl100k, tmp_path, shakespeare):
    path = tmp_path / "tok.json"
    trained_cl100k.save(path)
    loaded = load_tokenizer(str(path))
    assert loaded.fingerprint() == trained_cl100k.fingerprint()
    assert (loaded.name, loaded.pattern, loaded.special_tokens) == (
        trained_cl100k.name, trained_cl100k.pattern, trained_cl100k.special_tokens)
    assert loaded.mergeable_ranks == trained_cl100k.mergeable_ranks
    texts = [shakespeare[:20_000], random_text(random.Random(9), 2000), "x<|pad|>y<|endoftext|>"]
    for t in texts:
        assert loaded.encode(t, allowed_special="all") == trained_cl100k.encode(t, allowed_special="all")
    # The file is plain JSON with the documented fields; ranks[i] is the base64 of token i's bytes.
    obj = json.loads(path.read_text(encoding="utf-8"))
    assert obj["format"] == "llm_dist.bpe" and obj["version"] == 1
    assert base64.b64decode(obj["ranks"][300]) == trained_cl100k.token_bytes(300)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_gpt2_save_load(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2.json")
    assert load_bpe_file(tmp_path / "gpt2.json").encode("Hello world") == [15496, 995]


def test_fingerprint_tracks_content(trained, trained_cl100k, gpt2):
    fps = {t.fingerprint() for t in (trained, trained_cl100k, gpt2, load_tokenizer("byte"))}
    assert len(fps) == 4


def _write(tmp_path, name: str, content) -> str:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(p)


def _valid(trained) -> dict:
    ranks = [""] * len(trained.mergeable_ranks)
    for tok, r in trained.mergeable_ranks.items():
        ranks[r] = base64.b64encode(tok).decode()
    return {"format": "llm_dist.bpe", "version": 1, "name": "t", "pattern": trained.pattern,
            "special_tokens": dict(trained.special_tokens), "ranks": ranks}


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda o: "not json {", "not valid JSON"),
        (lambda o: b"\xff\xfe\x00garbage", "cannot read as UTF-8"),
        (lambda o: [1, 2, 3], '"format": "llm_dist.bpe"'),
        (lambda o: {**o, "format": "tiktoken"}, '"format": "llm_dist.bpe"'),
        (lambda o: {**o, "version": 2}, "expected version 1"),
        (lambda o: {**o, "pattern": "(unclosed"}, "not a valid regex"),
        (lambda o: {**o, "pattern": 5}, '"pattern" must be a regex string'),
        (lambda o: {**o, "special_tokens": {}}, "must be an object that includes '<|endoftext|>'"),
        (lambda o: {**o, "special_tokens": {"<|endoftext|>": 5}}, "also a BPE token's rank"),
        (lambda o: {**o, "ranks": "AA=="}, "list of base64 strings"),
        (lambda o: {**o, "ranks": o["ranks"][:255] + o["ranks"][256:]}, "single bytes"),
        (lambda o: {**o, "ranks": o["ranks"][:300] + ["@@not base64@@"]}, "ranks[300]"),
        (lambda o: {**o, "ranks": o["ranks"] + [o["ranks"][260]]}, "repeats ranks[260]"),
    ],
)
def test_bad_file_gives_one_clear_line(mutate, expected, trained, tmp_path):
    path = _write(tmp_path, "bad.json", mutate(_valid(trained)))
    with pytest.raises(TokenizerFileError) as e:
        load_tokenizer(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path) and expected in msg, msg


def test_valid_file_built_by_hand_loads(trained, tmp_path):
    # The positive control for the table above: the unmutated dict is accepted.
    path = _write(tmp_path, "ok.json", _valid(trained))
    assert load_tokenizer(path).encode_ordinary("hello there") == trained.encode_ordinary("hello there")


def test_bad_tiktoken_and_vocab_files(tmp_path):
    path = _write(tmp_path, "x.tiktoken", "IQ== 0\nnot-a-line\n")
    with pytest.raises(TokenizerFileError, match=r"x.tiktoken: line 2: expected '<base64 token> <rank>'"):
        load_tokenizer(path)
    path = _write(tmp_path, "few.tiktoken", "IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerFileError, match="all 256 single bytes"):
        load_tiktoken_file(path)
    folder = tmp_path / "hf"
    folder.mkdir()
    _write(folder, "vocab.json", "[]")
    _write(folder, "merges.txt", "#version: 0.2\n")
    with pytest.raises(TokenizerFileError, match=r"vocab.json: expected a JSON object mapping token strings"):
        load_tokenizer(str(folder))


def test_unknown_spec_names_the_value(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tokenizer 'gtp2' .*expected 'byte', 'gpt2'"):
        load_tokenizer("gtp2")
    with pytest.raises(ValueError, match="has no vocab.json"):
        load_tokenizer(str(tmp_path))


def test_loading_never_executes_code(tmp_path):
    """A pickle is not a tokenizer file: it is rejected as non-JSON, and its payload never runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = _write(tmp_path, "evil.json", pickle.dumps(Evil()))
    with pytest.raises(TokenizerFileError):
        load_tokenizer(path)
    assert not marker.exists()
