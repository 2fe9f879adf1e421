"""GPT-2's BPE from its published files: vocab.json + merges.txt (HF / OpenAI layout) or a .tiktoken file.

GPT-2 stores tokens as *strings*: each byte is mapped to a printable unicode character (`bytes_to_unicode`,
e.g. the space 0x20 -> "Ġ") so that vocab.json and merges.txt are readable text. We undo the mapping to
get token bytes, and the id in vocab.json is the tiktoken rank. merges.txt is not needed to encode
(ranks say the same thing) but it is checked: merge k (0-based) must produce id 256 + k, which is what
makes rank-based merging (tiktoken) equal to GPT-2's merge-list encoder.

A `.tiktoken` file is one "base64(token bytes) rank" per line and nothing else: it carries neither the
pattern nor the special tokens, so `load_tiktoken_file` takes them as arguments (GPT-2's by default).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from pathlib import Path

from llm_dist.bundled import ASSETS_DIR
from llm_dist.tokenizer.base import EOT
from llm_dist.tokenizer.bpe import BPETokenizer, TokenizerFileError
from llm_dist.tokenizer.pretokenize import GPT2_PATTERN

# The GPT-2 files shipped in the package (llm_dist/assets/gpt2_bpe/README.md; data/gpt2_bpe in a checkout).
GPT2_DIR = ASSETS_DIR / "gpt2_bpe"
GPT2_SPECIALS = {EOT: 50256}


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (openai/gpt-2 encoder.py).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) map
    to U+0100 onwards in byte order, so that no token string contains whitespace or control characters.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def unicode_to_bytes(token: str, where: str) -> bytes:
    """Invert `bytes_to_unicode` for one token string (`where` names the file for errors)."""
    dec = _byte_decoder()
    try:
        return bytes(dec[c] for c in token)
    except KeyError as e:
        raise TokenizerFileError(where, f"token {token!r} has character {e.args[0]!r} outside GPT-2's byte alphabet") from None


def load_vocab_merges(
    vocab_path: str | os.PathLike, merges_path: str | os.PathLike, pattern: str = GPT2_PATTERN, name: str = "gpt2"
) -> BPETokenizer:
    """Load a GPT-2-style byte-level BPE from vocab.json + merges.txt.

    Ranks are the 256 single bytes plus the result of every merge; any other vocab.json entry (GPT-2 has
    one: "<|endoftext|>" = 50256) is a special token.
    """
    vocab_path, merges_path = Path(vocab_path), Path(merges_path)
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(vocab_path, f"cannot read a JSON object of token -> id ({type(e).__name__})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise TokenizerFileError(vocab_path, "expected a JSON object mapping token strings to integer ids")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(merges_path, f"cannot read merges as UTF-8 text ({type(e).__name__})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]  # HF's header line
    lines = [ln for ln in lines if ln.strip()]

    byte_chars = bytes_to_unicode()
    ranks: dict[bytes, int] = {}
    for b in range(256):
        ch = byte_chars[b]
        if ch not in vocab:
            raise TokenizerFileError(vocab_path, f"expected every byte in the vocabulary; byte {b} ({ch!r}) is missing")
        ranks[bytes([b])] = vocab[ch]
    merged = set(byte_chars.values())
    for k, line in enumerate(lines):
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerFileError(merges_path, f"line {k + 2}: expected two space-separated tokens, got {line!r}")
        tok = parts[0] + parts[1]
        if parts[0] not in vocab or parts[1] not in vocab or tok not in vocab:
            raise TokenizerFileError(merges_path, f"line {k + 2}: merge {line!r} uses or makes a token not in {vocab_path.name}")
        ranks[unicode_to_bytes(tok, str(vocab_path))] = vocab[tok]
        merged.add(tok)
    specials = {s: i for s, i in vocab.items() if s not in merged}
    return BPETokenizer(name, pattern, ranks, specials)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a .tiktoken file ("base64 rank" per line) into token bytes -> rank."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerFileError(path, f"cannot read ({type(e).__name__}); expected a .tiktoken file") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            tok, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerFileError(path, f"line {n}: expected '<base64 token> <rank>'") from None
        if tok in ranks:
            raise TokenizerFileError(path, f"line {n}: token repeats the one with rank {ranks[tok]}")
        ranks[tok] = rank
    if not ranks:
        raise TokenizerFileError(path, "empty; expected '<base64 token> <rank>' lines")
    return ranks


def load_tiktoken_file(
    path: str | os.PathLike,
    pattern: str = GPT2_PATTERN,
    special_tokens: dict[str, int] | None = None,
    name: str | None = None,
) -> BPETokenizer:
    """Load a .tiktoken ranks file. Default specials: `<|endoftext|>` right after the highest rank."""
    ranks = read_tiktoken_ranks(path)
    if special_tokens is None:
        special_tokens = {EOT: max(ranks.values()) + 1}
    return BPETokenizer(name or Path(path).stem, pattern, ranks, special_tokens)


@functools.lru_cache(maxsize=1)
def load_gpt2() -> BPETokenizer:
    """GPT-2's tokenizer (50,257 ids, `<|endoftext|>` = 50256) from the bundled gpt2.tiktoken.

    Cached: the tokenizer is immutable and building the 50k-rank Encoding takes ~0.1 s.
    """
    path = GPT2_DIR / "gpt2.tiktoken"
    if not path.is_file():
        raise TokenizerFileError(path, "bundled GPT-2 ranks not found; the package should ship llm_dist/assets/gpt2_bpe/ "
                                       "(reinstall it)")
    return load_tiktoken_file(path, GPT2_PATTERN, dict(GPT2_SPECIALS), name="gpt2")
