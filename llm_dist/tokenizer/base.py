"""The interface every tokenizer in llm_dist implements.

A tokenizer maps text to integer ids and back. Data preparation, the trainer, checkpoints and sampling
only ever talk to this interface, so a byte-level tokenizer, a BPE trained here and GPT-2's own BPE are
interchangeable.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Iterable

EOT = "<|endoftext|>"


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set `name`, `special_tokens` and implement the abstract methods."""

    name: str  # short human-readable name, e.g. "byte" or "gpt2"
    special_tokens: dict[str, int]  # special token string -> id

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included (ids are 0 .. vocab_size-1)."""

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text, treating special-token strings in it as plain text."""

    @abstractmethod
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for (special tokens as their UTF-8 text)."""

    @abstractmethod
    def definition(self) -> dict:
        """A JSON-serialisable description that fully determines the tokenizer (hashed for fingerprints)."""

    @property
    def eot_id(self) -> int:
        """Id of `<|endoftext|>`, the document separator."""
        return self.special_tokens[EOT]

    def encode(self, text: str, allowed_special: str | set[str] = "none") -> list[int]:
        """Encode text; special-token strings listed in `allowed_special` ("all" = every one) become their ids."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special or ())
        if allowed_special == "none" or not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for piece, special in _split_specials(text, sorted(allowed, key=len, reverse=True)):
            ids.extend([self.special_tokens[piece]] if special else self.encode_ordinary(piece))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode several texts (subclasses may parallelise)."""
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text. Byte sequences that are not valid UTF-8 become U+FFFD (errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """sha256 (hex, first 16 chars) of the definition: prepared data records it so a mismatch is caught."""
        blob = json.dumps(self.definition(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _split_specials(text: str, specials: list[str]) -> list[tuple[str, bool]]:
    """Split text into (piece, is_special) runs, longest special first at each position."""
    out: list[tuple[str, bool]] = []
    start = i = 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit is None:
            i += 1
            continue
        if start < i:
            out.append((text[start:i], False))
        out.append((hit, True))
        i += len(hit)
        start = i
    if start < len(text):
        out.append((text[start:], False))
    return out
