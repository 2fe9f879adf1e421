"""Byte-level BPE trained from scratch, with incremental pair counts.

The algorithm (Sennrich et al. 2016, byte-level as in GPT-2):

1. Pre-tokenize the corpus with a GPT-style regex and count each distinct word once (`pretokenize.py`).
2. Start every word as its UTF-8 bytes (ids 0-255) and count adjacent pairs, weighted by word frequency.
3. Repeat: take the most frequent pair (a, b), give a+b the next id, replace (a, b) by it in every word.

A naive trainer recounts all pairs after each merge: O(merges x corpus). Here the counts are kept and
only the words that contain the merged pair are touched: `where[pair]` indexes the words a pair occurs in,
and for each such word we subtract its old pairs and add its new ones. The most frequent pair comes from
a max-heap with lazy invalidation: every count change pushes a fresh entry, and a popped entry whose count
no longer matches the live count is stale and skipped. `where` is also lazy: a word that lost a pair stays
in its set and is skipped when it turns out not to contain the pair any more.

Tie-breaking (deterministic): among pairs with the highest count, the one with the smallest (a, b) wins,
comparing ids, i.e. first by the left token, then the right one. Byte tokens order by byte value, learned
tokens by age. HF tokenizers uses the same rule over its own ids, which order bytes by their GPT-2 unicode
stand-ins, so on ties the two can pick different merges; without ties they agree (tests check this).

Duplicate results: could two different pairs spell the same bytes (ab+c and a+bc)? With left-to-right
merging it does not seem to happen (GPT-2's 50,000 merges made 50,000 distinct tokens, and thousands of
random tie-heavy corpora in our tests never produced one), but tiktoken-style ranks require one id per
byte string, so should it happen the merge maps to the existing id, as HF tokenizers does, instead of
creating a second token with the same bytes.
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from llm_dist.tokenizer.base import EOT
from llm_dist.tokenizer.pretokenize import count_words_parallel, resolve_pattern
from llm_dist.tokenizer.progress import Progress

# Pair (a, b) is packed into one int a << SHIFT | b: hashing and comparing one int is faster than a tuple,
# and packed ints order exactly like (a, b) tuples, which is what the tie-break needs.
_SHIFT = 32
_MASK = (1 << _SHIFT) - 1


@dataclass
class BPETrainResult:
    """What training produced: the token byte strings (index = id = rank), the merges, and the setup."""

    vocab: list[bytes]  # id -> bytes, ids 0..len-1 (256 bytes, then learned tokens in merge order)
    merges: list[tuple[int, int, int]]  # (left id, right id, result id) in the order they were learned
    merge_counts: list[int]  # the (frequency-weighted) count of each merged pair when it was chosen
    pattern: str
    special_tokens: dict[str, int]
    stats: dict = field(default_factory=dict)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """tiktoken's view: token bytes -> rank (= id)."""
        return {tok: i for i, tok in enumerate(self.vocab)}

    def to_tokenizer(self, name: str = "bpe"):  # -> BPETokenizer (imported lazily: bpe.py imports us)
        """The tiktoken-backed tokenizer for these ranks."""
        from llm_dist.tokenizer.bpe import BPETokenizer

        return BPETokenizer(name, self.pattern, self.mergeable_ranks, self.special_tokens)


def learn_merges(
    word_counts: Mapping[str, int] | Mapping[bytes, int], num_merges: int, progress: bool = False
) -> tuple[list[bytes], list[tuple[int, int, int]], list[int]]:
    """Learn up to num_merges merges from {word: count}. Returns (vocab, merges, merge_counts).

    Stops early when no pair occurs any more (every word is a single token).
    """
    words: list[list[int]] = []
    freqs: list[int] = []
    for w, c in word_counts.items():
        b = w.encode("utf-8") if isinstance(w, str) else bytes(w)
        if len(b) >= 2 and c > 0:  # single-byte words have no pairs and can never change
            words.append(list(b))
            freqs.append(int(c))

    pair_counts: dict[int, int] = defaultdict(int)
    where: dict[int, set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for x, y in zip(w, w[1:]):
            p = x << _SHIFT | y
            pair_counts[p] += f
            where[p].add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    ids_by_bytes: dict[bytes, int] = {tok: i for i, tok in enumerate(vocab)}
    merges: list[tuple[int, int, int]] = []
    merge_counts: list[int] = []
    with Progress("merges", total=num_merges, unit="merges", enabled=progress) as bar:
        while len(vocab) - 256 < num_merges and heap:
            neg, p = heapq.heappop(heap)
            if pair_counts.get(p, 0) != -neg:
                continue  # stale: the pair's count changed after this entry was pushed
            a, b = p >> _SHIFT, p & _MASK
            new_bytes = vocab[a] + vocab[b]
            new_id = ids_by_bytes.get(new_bytes)
            if new_id is None:
                new_id = len(vocab)
                vocab.append(new_bytes)
                ids_by_bytes[new_bytes] = new_id
                bar.update()
            merges.append((a, b, new_id))
            merge_counts.append(-neg)
            _apply_merge(a, b, new_id, words, freqs, pair_counts, where, heap)
    return vocab, merges, merge_counts


def _apply_merge(
    a: int,
    b: int,
    new_id: int,
    words: list[list[int]],
    freqs: list[int],
    pair_counts: dict[int, int],
    where: dict[int, set[int]],
    heap: list[tuple[int, int]],
) -> None:
    """Replace (a, b) by new_id in every word containing it; update counts, index and heap incrementally."""
    delta: dict[int, int] = defaultdict(int)
    for wi in where.pop(a << _SHIFT | b, ()):
        w = words[wi]
        n = len(w)
        # Merge left to right, non-overlapping: "aaa" with (a, a) -> [aa, a], as GPT-2's encoder does.
        out: list[int] = []
        i = 0
        hit = False
        while i < n:
            if i + 1 < n and w[i] == a and w[i + 1] == b:
                out.append(new_id)
                i += 2
                hit = True
            else:
                out.append(w[i])
                i += 1
        if not hit:
            continue  # stale index entry: an earlier merge already consumed this word's (a, b)
        f = freqs[wi]
        for x, y in zip(w, w[1:]):
            delta[x << _SHIFT | y] -= f
        for x, y in zip(out, out[1:]):
            p = x << _SHIFT | y
            delta[p] += f
            if x == new_id or y == new_id:
                where[p].add(wi)  # other pairs of `out` were pairs of `w`, already indexed
        words[wi] = out
    for p, d in delta.items():
        if d == 0:
            continue
        c = pair_counts[p] + d
        if c > 0:
            pair_counts[p] = c
            heapq.heappush(heap, (-c, p))
        else:
            del pair_counts[p]


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (EOT,),
    num_proc: int | None = 1,
    progress: bool = True,
) -> BPETrainResult:
    """Train a byte-level BPE on documents. vocab_size counts everything: 256 bytes + merges + specials.

    Special-token strings in the text are cut out before pre-tokenization (they are never merged) and get
    the ids after the learned tokens, in the order given. `<|endoftext|>` is always included.
    """
    specials = list(dict.fromkeys(special_tokens))
    if EOT not in specials:
        specials.insert(0, EOT)
    num_merges = vocab_size - 256 - len(specials)
    if num_merges < 0:
        raise ValueError(f"vocab_size={vocab_size} is too small: need at least 256 bytes + {len(specials)} specials")
    pat = resolve_pattern(pattern)

    t0 = time.perf_counter()
    counts = count_words_parallel(texts, pat, specials, num_proc=num_proc, progress=progress)
    t1 = time.perf_counter()
    vocab, merges, merge_counts = learn_merges(counts, num_merges, progress=progress)
    t2 = time.perf_counter()
    if progress and len(vocab) - 256 < num_merges:
        print(f"note: corpus ran out of pairs after {len(vocab) - 256} merges (asked {num_merges})", flush=True)
    special_ids = {s: len(vocab) + i for i, s in enumerate(specials)}
    stats = {
        "pretokenize_s": t1 - t0,
        "merge_s": t2 - t1,
        "unique_words": len(counts),
        "words": sum(counts.values()),
        "num_merges": len(merges),
    }
    return BPETrainResult(vocab, merges, merge_counts, pat, special_ids, stats)
