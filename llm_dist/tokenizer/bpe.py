"""Byte-level BPE tokenizer backed by tiktoken, and its one-file JSON format.

A BPE tokenizer is fully described by three things: the pre-tokenization regex, the mergeable ranks
(token bytes -> rank; the rank is also the id, and lower rank = merged earlier), and the special tokens.
That is exactly what `tiktoken.Encoding` takes, so encoding runs in tiktoken's Rust core (and
`encode_batch` in its thread pool) whether the ranks came from our trainer, GPT-2's vocab.json/merges.txt
or a `.tiktoken` file. `reference.py` holds a pure-Python encoder with the same semantics for testing.

Saved-file format (`save` / `load_bpe_file`, documented in docs/tokenizer.md): one UTF-8 JSON object

    {"format": "llm_dist.bpe", "version": 1, "name": "...", "pattern": "<regex>",
     "special_tokens": {"<|endoftext|>": 1023}, "ranks": ["AA==", "AQ==", ...], "meta": {...}}

where ranks[i] is the base64 of the bytes of token id i (the encoding tiktoken's files use). Loading
parses JSON and validates every field; nothing is executed or unpickled, and any problem is reported as
one `TokenizerFileError` line naming the file and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import regex
import tiktoken

from llm_dist.tokenizer.base import EOT, Tokenizer

FORMAT = "llm_dist.bpe"
VERSION = 1


class TokenizerFileError(ValueError):
    """A tokenizer file is missing, unreadable or malformed. The message is one line naming the file."""

    def __init__(self, path: str | os.PathLike, expected: str) -> None:
        super().__init__(f"{path}: {expected}")


def check_ranks(ranks: dict[bytes, int], special_tokens: dict[str, int], where: str) -> None:
    """Raise TokenizerFileError unless ranks/specials form a usable byte-level BPE vocabulary.

    Byte-level means every single byte must be a token (else some text has no encoding and tiktoken
    panics); ids must not collide; specials must not reuse a rank id.
    """
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerFileError(where, f"expected all 256 single bytes among the tokens, {len(missing)} missing")
    ids = list(ranks.values())
    if len(set(ids)) != len(ids):
        raise TokenizerFileError(where, "expected distinct ranks, found a rank used by two tokens")
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise TokenizerFileError(where, "expected ranks to be non-negative integers")
    rank_ids = set(ids)
    for s, i in special_tokens.items():
        if not isinstance(s, str) or not s or not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerFileError(where, f"expected special tokens as non-empty string -> id >= 0, got {s!r}: {i!r}")
        if i in rank_ids:
            raise TokenizerFileError(where, f"special token {s!r} has id {i}, which is also a BPE token's rank")
    if len(set(special_tokens.values())) != len(special_tokens):
        raise TokenizerFileError(where, "expected distinct special token ids")


class BPETokenizer(Tokenizer):
    """Byte-level BPE: a regex pattern, mergeable ranks (bytes -> id) and special tokens, run by tiktoken.

    Text with lone surrogates (not valid Unicode scalar values) is encoded as if each were U+FFFD, as
    tiktoken does; every other string round-trips: `decode(encode(x)) == x`.
    """

    def __init__(
        self,
        name: str,
        pattern: str,
        mergeable_ranks: dict[bytes, int],
        special_tokens: dict[str, int],
        meta: dict | None = None,
    ) -> None:
        check_ranks(mergeable_ranks, special_tokens, f"tokenizer {name!r}")
        self.name = name
        self.pattern = pattern
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens)
        self.meta = dict(meta or {})
        self._enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self._n_vocab = self._enc.max_token_value + 1
        # tiktoken's default pool is 8 threads; more than the cores we have only adds contention.
        self._threads = max(1, min(8, os.cpu_count() or 1))

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The underlying tiktoken Encoding (e.g. for tiktoken-only APIs)."""
        return self._enc

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode(self, text: str, allowed_special: str | set[str] = "none") -> list[int]:
        # Same contract as the base class: specials not allowed are plain text (never an error), so tell
        # tiktoken to disallow nothing; tiktoken finds the allowed ones in one Rust pass.
        if allowed_special == "none" or not allowed_special:
            return self._enc.encode_ordinary(text)
        allowed = "all" if allowed_special == "all" else set(allowed_special)
        if allowed != "all" and not allowed <= set(self.special_tokens):
            raise ValueError(f"allowed_special: {sorted(allowed - set(self.special_tokens))} are not special tokens of {self.name!r}")
        return self._enc.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode_ordinary over many texts in tiktoken's thread pool (the Rust core releases the GIL)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=self._threads)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]  # numpy / torch integers -> Python ints for the Rust core
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError):
            # tiktoken raises KeyError for unknown ids and OverflowError for negatives; say which id.
            bad = next(i for i in ids if not 0 <= i < self._n_vocab or not self._decodable(i))
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.name!r} ({self.vocab_size} ids)") from None

    def _decodable(self, i: int) -> bool:
        try:
            self._enc.decode_single_token_bytes(i)
            return True
        except KeyError:
            return False

    def token_bytes(self, i: int) -> bytes:
        """The bytes of one token id."""
        return self.decode_bytes([i])

    def definition(self) -> dict:
        # The ranks are summarised by a sha256 so that fingerprinting is cheap for 100k-token vocabularies;
        # the name is left out on purpose: GPT-2 loaded from vocab.json or from gpt2.tiktoken is one tokenizer.
        h = hashlib.sha256()
        for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(f"{rank}:".encode() + base64.b64encode(tok) + b"\n")
        return {
            "type": "bpe",
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "n_ranks": len(self.mergeable_ranks),
            "ranks_sha256": h.hexdigest(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the one-file JSON format described in the module docstring (atomically)."""
        ids = sorted(self.mergeable_ranks.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"cannot save {self.name!r}: ranks are not contiguous 0..{len(ids) - 1}")
        ranks = [""] * len(ids)
        for tok, rank in self.mergeable_ranks.items():
            ranks[rank] = base64.b64encode(tok).decode("ascii")
        obj = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "meta": self.meta,
            "ranks": ranks,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        # One rank per line keeps the file diffable and greppable; the header fields come first.
        body = json.dumps(obj, ensure_ascii=False, indent=1)
        tmp.write_text(body + "\n", encoding="utf-8")
        os.replace(tmp, path)


def load_bpe_file(path: str | os.PathLike) -> BPETokenizer:
    """Load a tokenizer saved by `BPETokenizer.save`. Raises TokenizerFileError (one line) if malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerFileError(path, "no such file; expected a tokenizer JSON file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(path, f"cannot read as UTF-8 text ({type(e).__name__}); expected a tokenizer JSON file") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(path, f"not valid JSON ({e.msg} at line {e.lineno}); expected a {FORMAT} file") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TokenizerFileError(path, f'expected a JSON object with "format": "{FORMAT}"')
    if obj.get("version") != VERSION:
        raise TokenizerFileError(path, f"expected version {VERSION}, got {obj.get('version')!r}")
    name, pattern, specials, ranks = obj.get("name"), obj.get("pattern"), obj.get("special_tokens"), obj.get("ranks")
    if not isinstance(name, str):
        raise TokenizerFileError(path, '"name" must be a string')
    if not isinstance(pattern, str):
        raise TokenizerFileError(path, '"pattern" must be a regex string')
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise TokenizerFileError(path, f'"pattern" is not a valid regex ({e})') from None
    if not isinstance(specials, dict) or EOT not in specials:
        raise TokenizerFileError(path, f'"special_tokens" must be an object that includes {EOT!r}')
    if not isinstance(ranks, list) or not all(isinstance(r, str) for r in ranks):
        raise TokenizerFileError(path, '"ranks" must be a list of base64 strings (index = token id)')
    mergeable: dict[bytes, int] = {}
    for i, r in enumerate(ranks):
        try:
            tok = base64.b64decode(r, validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerFileError(path, f"ranks[{i}] = {r[:20]!r} is not valid base64") from None
        if not tok or tok in mergeable:
            raise TokenizerFileError(path, f"ranks[{i}] is empty or repeats ranks[{mergeable.get(tok)}]")
        mergeable[tok] = i
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise TokenizerFileError(path, '"meta" must be an object')
    check_ranks(mergeable, specials, str(path))
    return BPETokenizer(name, pattern, mergeable, specials, meta=meta)
