"""The training CLI end to end on a small corpus: files/globs in, a loadable tokenizer out."""

from __future__ import annotations

import pytest

from llm_dist.tokenizer import load_tokenizer
from tests.helpers import load_tool


def test_train_tokenizer_cli(tmp_path, shakespeare, capsys):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(shakespeare[i * 40_000 : (i + 1) * 40_000], encoding="utf-8")
    out = tmp_path / "tok.json"
    summary = load_tool("train_tokenizer").main([
        str(tmp_path / "part*.txt"), "--vocab-size", "400", "--pattern", "cl100k",
        "--special", "<|pad|>", "--num-proc", "2", "--out", str(out), "--quiet",
    ])
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 400 and set(tok.special_tokens) == {"<|endoftext|>", "<|pad|>"}
    assert summary["fingerprint"] == tok.fingerprint()
    # The reported compression is the real one: recount it with the loaded tokenizer.
    text = "".join((tmp_path / f"part{i}.txt").read_text(encoding="utf-8") for i in range(3))
    n_tokens = sum(len(tok.encode_ordinary(shakespeare[i * 40_000 : (i + 1) * 40_000])) for i in range(3))
    assert summary["tokens"] == n_tokens and summary["input_bytes"] == len(text.encode())
    assert "bytes/token" in capsys.readouterr().out


def test_train_tokenizer_cli_rejects_missing_input(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        load_tool("train_tokenizer").main([str(tmp_path / "nope*.txt"), "--vocab-size", "300", "--out", str(tmp_path / "t.json")])
