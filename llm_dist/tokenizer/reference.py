"""Pure-Python reference BPE encoder: the specification that the tiktoken path is tested against.

Deliberately naive and slow (no cache, no tricks), so that it is easy to check by reading:

1. lone surrogates -> U+FFFD (the same rule as tiktoken, see `pretokenize.scrub_surrogates`);
2. split the text with the pre-tokenization regex (Python's `regex` module; tiktoken uses Rust's
   fancy-regex for the same pattern, so this also cross-checks the two regex engines);
3. for each piece, start from its UTF-8 bytes and repeatedly merge the adjacent pair whose concatenation
   has the lowest rank, all non-overlapping occurrences left to right, until no adjacent pair is a token;
4. map the final token bytes to their ranks (= ids).
"""

from __future__ import annotations

from typing import Iterable

import regex

from llm_dist.tokenizer.pretokenize import scrub_surrogates


def bpe_merge_piece(piece: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """The classic rank-based merge loop on one pre-token's bytes."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best_rank, best = None, None
        for x, y in zip(parts, parts[1:]):
            r = ranks.get(x + y)
            if r is not None and (best_rank is None or r < best_rank):
                best_rank, best = r, (x, y)
        if best is None:
            break
        merged: list[bytes] = []
        i = 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def reference_encode_ordinary(text: str, pattern: str, ranks: dict[bytes, int]) -> list[int]:
    """Encode text (special-token strings are plain text) exactly as the tiktoken path should."""
    ids: list[int] = []
    for piece in regex.findall(pattern, scrub_surrogates(text)):
        ids.extend(ranks[tok] for tok in bpe_merge_piece(piece.encode("utf-8"), ranks))
    return ids


def reference_encode(
    text: str, pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int], allowed_special: Iterable[str]
) -> list[int]:
    """Encode with the allowed special-token strings mapped to their ids (longest match first)."""
    allowed = sorted(set(allowed_special), key=len, reverse=True)
    if not allowed:
        return reference_encode_ordinary(text, pattern, ranks)
    ids: list[int] = []
    # regex.split with a capturing group keeps the separators at odd positions.
    group = "(" + "|".join(regex.escape(s) for s in allowed) + ")"
    for k, piece in enumerate(regex.split(group, scrub_surrogates(text))):
        if k % 2:
            ids.append(special_tokens[piece])
        elif piece:
            ids.extend(reference_encode_ordinary(piece, pattern, ranks))
    return ids


def reference_decode_bytes(ids: Iterable[int], ranks: dict[bytes, int], special_tokens: dict[str, int]) -> bytes:
    """Concatenate each id's bytes (specials as their UTF-8 text)."""
    inv = {i: tok for tok, i in ranks.items()}
    inv.update({i: s.encode("utf-8") for s, i in special_tokens.items()})
    return b"".join(inv[int(i)] for i in ids)


__all__ = ["bpe_merge_piece", "reference_encode_ordinary", "reference_encode", "reference_decode_bytes"]
