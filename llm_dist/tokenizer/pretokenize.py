"""Regex pre-tokenization: split text into "words" that BPE merges never cross, and count them.

GPT-style BPE never merges across a pre-token boundary, so training only needs each distinct pre-token
once, with its frequency: Tiny Shakespeare's ~300k pre-tokens collapse to ~25k distinct words, and the
merge loop works on those. Counting is the only pass over the raw text, so for large corpora it is spread
over processes: the text is cut into chunks at boundaries that no pattern match can straddle, each
process counts its chunks, and the counts are summed. The result is identical to a single-process count
(tests hold it so).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import Counter
from typing import Iterable, Iterator

import regex

from llm_dist.tokenizer.progress import Progress

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py), with the contractions grouped as tiktoken writes it:
# contractions, optionally-space-prefixed runs of letters / digits / other symbols, then whitespace. The
# `\s+(?!\S)` branch leaves the last space of a run to prefix the next word (" world").
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-4's cl100k_base pre-tokenizer (tiktoken): case-insensitive contractions, numbers in groups of at most
# three digits, punctuation runs that absorb trailing newlines, and newline-aware whitespace.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)

PATTERNS: dict[str, str] = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN}

# Texts shorter than this are counted in-process even when num_proc > 1: starting workers costs more.
DEFAULT_CHUNK_CHARS = 1 << 20


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "cl100k") or a raw regex -> the regex string (checked to compile)."""
    pat = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pat)
    except regex.error as e:
        raise ValueError(
            f"pattern {pattern!r} is neither one of {sorted(PATTERNS)} nor a valid regex: {e}"
        ) from None
    return pat


def scrub_surrogates(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8) with U+FFFD, exactly as tiktoken does.

    Python strings may hold lone surrogates (e.g. from `surrogateescape` decoding or JSON "\\ud800"); no
    UTF-8 byte sequence stands for them, so a byte-level BPE cannot represent them. tiktoken round-trips
    the text through UTF-16 with errors="replace", which also joins a well-formed surrogate *pair* into
    its astral character; we do the same so every encoder in this package agrees.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def split_specials(text: str, specials: Iterable[str]) -> list[str]:
    """The pieces of text between occurrences of special tokens (which BPE training must never merge)."""
    specials = sorted(set(specials), key=len, reverse=True)
    if not specials:
        return [text]
    # Longest first, so that a special that is a prefix of another does not split it.
    return [p for p in regex.split("|".join(regex.escape(s) for s in specials), text) if p]


def count_words(text: str, pattern: str, specials: Iterable[str] = ()) -> Counter[str]:
    """Count the pre-tokens of one text (single process); special-token strings are cut out first."""
    pat = regex.compile(resolve_pattern(pattern))
    counts: Counter[str] = Counter()
    for piece in split_specials(scrub_surrogates(text), specials):
        counts.update(pat.findall(piece))
    return counts


def _is_space(ch: str) -> bool:
    return ch.isspace()


def safe_cut_points(text: str, target_chars: int) -> list[int]:
    """Cut positions (excluding 0 and len) roughly every target_chars, each after a lone line break.

    A cut at i is safe when text[i-1] == "\\n" and neither text[i-2] nor text[i] is whitespace: with a
    single newline between two non-space characters, every supported pattern (GPT-2, cl100k) ends a match
    right after the newline and none starts before it and continues past it, so the chunks pre-tokenize
    exactly as the whole does. (A whitespace run would not be safe: GPT-2's `\\s+(?!\\S)` keeps "\\n\\n"
    together at the end of a chunk but splits it before a letter.) Custom patterns that match across such a
    newline should be trained with num_proc=1.
    """
    cuts: list[int] = []
    pos = target_chars
    n = len(text)
    while pos < n:
        i = text.find("\n", pos)
        while i != -1 and i + 1 < n and (_is_space(text[i + 1]) or i == 0 or _is_space(text[i - 1])):
            i = text.find("\n", i + 1)
        if i == -1 or i + 1 >= n:
            break
        cuts.append(i + 1)
        pos = i + 1 + target_chars
    return cuts


def iter_chunks(texts: Iterable[str], specials: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Cut documents into pre-tokenization chunks: at special tokens first, then at safe line breaks."""
    specials = list(specials)
    for text in texts:
        for piece in split_specials(scrub_surrogates(text), specials):
            start = 0
            for cut in safe_cut_points(piece, chunk_chars):
                yield piece[start:cut]
                start = cut
            yield piece[start:]


def _count_chunk(args: tuple[str, str]) -> tuple[Counter[str], int]:
    """Worker: count one chunk's pre-tokens (top-level so that it pickles for multiprocessing)."""
    chunk, pat = args
    return Counter(regex.findall(pat, chunk)), len(chunk)


def count_words_parallel(
    texts: Iterable[str],
    pattern: str,
    specials: Iterable[str] = (),
    num_proc: int | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    progress: bool = True,
) -> Counter[str]:
    """Count pre-tokens over many documents with `num_proc` processes (None = all CPUs, 1 = in-process).

    The result does not depend on num_proc or chunk_chars: chunks are cut only where pre-tokenization
    cannot tell the difference (see `safe_cut_points`), and Counter addition is order-independent.
    """
    pat = resolve_pattern(pattern)
    texts = list(texts)
    total = sum(len(t) for t in texts)
    if num_proc is None:
        num_proc = os.cpu_count() or 1
    # More workers than chunks is pure overhead.
    num_proc = max(1, min(num_proc, -(-total // max(chunk_chars, 1))))
    counts: Counter[str] = Counter()
    jobs = ((c, pat) for c in iter_chunks(texts, specials, chunk_chars))
    with Progress("pre-tokenize", total=total, unit="chars", enabled=progress) as bar:
        if num_proc == 1:
            for job in jobs:
                chunk_counts, n = _count_chunk(job)
                counts.update(chunk_counts)
                bar.update(n)
        else:
            with mp.get_context().Pool(num_proc) as pool:
                for chunk_counts, n in pool.imap_unordered(_count_chunk, jobs):
                    counts.update(chunk_counts)
                    bar.update(n)
    return counts
