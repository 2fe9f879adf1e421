"""Paths and random-text generators for the tokenizer tests.

A helper module, not a test file; its name is unique across tests/ because pytest puts this folder on
sys.path (rootdir-relative imports without __init__.py).
"""

from __future__ import annotations

import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "tinyshakespeare" / "input.txt"
GPT2_DIR = REPO / "data" / "gpt2_bpe"


# Character pools for random text. Each one targets something that has broken byte-level BPEs before:
# multi-byte UTF-8 (2, 3 and 4 bytes), combining marks that attach to the previous letter, control and
# exotic whitespace characters (regex \s vs str.isspace), non-ASCII digits (\p{N}) and apostrophes next
# to letters (the contraction branch of the patterns).
POOLS = {
    "ascii": [chr(c) for c in range(32, 127)],
    "space": [" ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2028", "\u3000", "\u200b"],
    "control": [chr(c) for c in list(range(0, 32)) + [127, 0x85]],
    "latin": [chr(c) for c in range(0xA0, 0x250)],
    "combining": [chr(c) for c in range(0x300, 0x370)],
    "cjk": [chr(c) for c in range(0x4E00, 0x4E00 + 200)] + [chr(c) for c in range(0x3040, 0x30FF)],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧", "🇩🇪", "🧪", "❤️", "𝔘𝔫𝔦", "𐍈", "\U0001F9D1\u200D\U0001F4BB"],
    "digits": list("0123456789") + ["١٢٣", "४२", "½", "²", "Ⅻ"],
    "words": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "don't", " the", " hello", "HTTP", "x=1;", "def f():"],
}


def random_text(rng: random.Random, n: int, pools: tuple[str, ...] = tuple(POOLS)) -> str:
    """n random pieces drawn from the named pools (a piece may be several characters)."""
    return "".join(rng.choice(POOLS[rng.choice(pools)]) for _ in range(n))


def random_codepoints(rng: random.Random, n: int) -> str:
    """n code points drawn uniformly from all of Unicode except the surrogates (assigned or not)."""
    out = []
    while len(out) < n:
        c = rng.randrange(0x110000)
        if not 0xD800 <= c <= 0xDFFF:
            out.append(chr(c))
    return "".join(out)
