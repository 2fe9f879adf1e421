"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes of the text, special tokens follow from 256.

Any Python string round-trips exactly: text is encoded with UTF-8 using "surrogatepass", so even lone
surrogates survive `decode(encode(x)) == x` when decoded with `decode_surrogates`; `decode` itself uses
errors="replace" for byte sequences that are not valid UTF-8 (e.g. a sample cut mid-character).
"""

from __future__ import annotations

from typing import Iterable

from llm_dist.tokenizer.base import EOT, Tokenizer


class ByteTokenizer(Tokenizer):
    """256 byte ids plus special tokens (default: just `<|endoftext|>` = 256)."""

    name = "byte"

    def __init__(self, specials: Iterable[str] = (EOT,)) -> None:
        specials = list(specials)
        if EOT not in specials:
            specials.insert(0, EOT)
        self.special_tokens = {s: 256 + i for i, s in enumerate(specials)}
        self._id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                out.append(i)
            elif i in self._id_to_special:
                out += self._id_to_special[i]
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary of {self.vocab_size}")
        return bytes(out)

    def decode_surrogates(self, ids: Iterable[int]) -> str:
        """Exact inverse of `encode` for any Python string, lone surrogates included."""
        return self.decode_bytes(ids).decode("utf-8", errors="surrogatepass")

    def definition(self) -> dict:
        return {"type": "byte", "special_tokens": self.special_tokens}
