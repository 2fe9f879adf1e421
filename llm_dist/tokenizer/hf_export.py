"""Any llm_dist tokenizer as a Hugging Face `tokenizers.Tokenizer`, and the files `AutoTokenizer` loads.

Every tokenizer here is a byte-level BPE in disguise: `ByteTokenizer` is BPE with the 256 single bytes as
its only ranks and no pre-tokenization, GPT-2's and the ones trained here are tiktoken ranks plus a regex.
The HF equivalent, piece by piece:

    pre-tokenizer   Split(pattern, "isolated") then ByteLevel(use_regex=False): the project's regex cuts the
                    text into words, ByteLevel maps each word's UTF-8 bytes to GPT-2's printable characters
                    (`bytes_to_unicode`), the alphabet the vocabulary is written in. (Byte tokenizer: no Split.)
    model           BPE(vocab, merges, ignore_merges=True). tiktoken merges the adjacent pair whose
                    concatenation has the lowest rank; HF merges the pair with the lowest *merge* index. So
                    every way of splitting a token into two tokens is a merge, ordered by the rank of the
                    result: the candidates and their order are then tiktoken's. `ignore_merges` mirrors
                    tiktoken's shortcut of taking a whole word that is itself a token without merging.
    specials        added tokens (special=True, not normalised) with the project's ids; they are also in
                    the BPE vocabulary so that HF keeps those exact ids whatever the order.
    decoder         ByteLevel: characters back to bytes, then UTF-8 with U+FFFD for invalid sequences
                    (Rust's from_utf8_lossy replaces each maximal invalid subpart, as Python's
                    errors="replace" does), so `decode` equals `Tokenizer.decode` for any id sequence.

Differences that remain, by construction: HF always treats special-token strings found in text as the
special tokens (the project's `encode_ordinary` treats them as text; `encode(text, allowed_special="all")`
is the equal call), and a Python string with lone surrogates cannot cross into the Rust library at all.
The equality of ids and decoded text on random Unicode is held by tests/tokenizer/test_hf_export.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llm_dist.tokenizer.base import Tokenizer
from llm_dist.tokenizer.bpe import BPETokenizer
from llm_dist.tokenizer.byte import ByteTokenizer
from llm_dist.tokenizer.gpt2 import bytes_to_unicode

PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")  # a special with one of these names is the padding token


def ranks_of(tok: Tokenizer) -> tuple[dict[bytes, int], str | None]:
    """(mergeable ranks: token bytes -> id, pre-tokenization regex or None) of a project tokenizer."""
    if isinstance(tok, ByteTokenizer):
        return {bytes([b]): b for b in range(256)}, None
    if isinstance(tok, BPETokenizer):
        return tok.mergeable_ranks, tok.pattern
    raise TypeError(f"no Hugging Face conversion for a {type(tok).__name__}")


# An atom (\p{..} / \P{..}, an escape, a [...] class without nested brackets, one character) followed by
# {n,m}+, {n,}+ or {n}+.
_POSSESSIVE_INTERVAL = re.compile(r"(\\[pP]\{[^}]*\}|\\.|\[(?:\\.|[^\]\\])*\]|[^\\\[\]()|])(\{\d+(?:,\d*)?\})\+")


def onig_pattern(pattern: str) -> str:
    """The regex as Oniguruma (the engine of HF `tokenizers`) must read it to match as tiktoken does.

    One construct differs: a possessive interval. `\\p{N}{1,3}+` (cl100k's digits) is possessive in
    tiktoken's engine (fancy-regex) and Python's `regex`, but Ruby-syntax Oniguruma reads the `+` as a
    repeat of the interval, i.e. any run of digits. The atomic group `(?>\\p{N}{1,3})` is the same
    possessive match in every engine. (`?+`, `*+`, `++` are possessive in Oniguruma too.)
    """
    out = _POSSESSIVE_INTERVAL.sub(r"(?>\1\2)", pattern)
    if re.search(r"\)\{\d+(?:,\d*)?\}\+", out):  # a group under a possessive interval: not rewritten above
        raise ValueError(f"pattern {pattern!r}: a possessive interval on a group ')'{{n,m}}+ has no Oniguruma "
                         "equivalent here; write it as an atomic group (?>(...){n,m})")
    return out


def _as_chars(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split (left, right) of every multi-byte token into two tokens, ordered by the rank of the token
    made, then by the ranks of the parts (the order only matters between merges that make the same token)."""
    out: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                out.append((rank, ranks[left], ranks[right], left, right))
    out.sort()
    return [(left, right) for *_, left, right in out]


def build_hf_tokenizer(tok: Tokenizer):  # noqa: ANN201 - tokenizers.Tokenizer (an optional dependency)
    """The `tokenizers.Tokenizer` that encodes and decodes exactly as `tok` (see the module docstring)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from llm_dist.tokenizer.hf_import import HFTokenizer as ImportedTokenizer

    if isinstance(tok, ImportedTokenizer):  # imported from an HF folder: its own tokenizer.json (+ chat tokens)
        hf = HFTokenizer.from_str(tok.hf_json())
        hf.encode_special_tokens = False  # HF's default: special-token strings in text are the specials
        return hf
    ranks, pattern = ranks_of(tok)
    vocab = {_as_chars(t): i for t, i in ranks.items()}
    clash = [s for s in tok.special_tokens if s in vocab]
    if clash:  # a special spelled like a byte-level token would shadow it in the one vocabulary
        raise ValueError(f"special token {clash[0]!r} is spelled like an ordinary token in byte-level form")
    vocab.update(tok.special_tokens)
    merges = [(_as_chars(a), _as_chars(b)) for a, b in merges_from_ranks(ranks)]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False)
    hf = HFTokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pattern is None:
        hf.pre_tokenizer = byte_level
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(onig_pattern(pattern)), behavior="isolated", invert=False), byte_level])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                      single_word=False)
                           for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])])
    for s, i in tok.special_tokens.items():
        if hf.token_to_id(s) != i:
            raise AssertionError(f"special token {s!r} got id {hf.token_to_id(s)} in the HF tokenizer, not {i}")
    return hf


def eot_token(tok: Tokenizer) -> str:
    """The special token that separates documents (`tok.eot_id`): `<|endoftext|>` for the project's
    tokenizers, the model's eos token for an imported one (e.g. `</s>`)."""
    return next(s for s, i in tok.special_tokens.items() if i == tok.eot_id)


def special_roles(tok: Tokenizer, eos: str | None = None) -> dict[str, str]:
    """bos/eos/pad/unk token strings for `tokenizer_config.json`.

    `<|endoftext|>` separates documents in pretraining, so it is what a sequence starts after (bos) and
    ends with (eos, unless `eos` names another special, e.g. a chat model's end-of-turn token); GPT-2's HF
    files make the same choice, unk included (a byte-level BPE never produces it). Padding is a special
    named like a pad token if the tokenizer has one, else `<|endoftext|>` (padded positions are masked).
    An imported tokenizer keeps its own bos (and `<unk>`), with its eos as the separator.
    """
    eot = eot_token(tok)
    pad = next((p for p in PAD_NAMES if p in tok.special_tokens), eot)
    eos = eos or eot
    if eos not in tok.special_tokens:
        raise ValueError(f"eos token {eos!r} is not a special token of {tok.name!r}")
    bos = getattr(tok, "bos_token", None) or eot
    unk = "<unk>" if "<unk>" in tok.special_tokens else eot
    return {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}


def save_hf_tokenizer(tok: Tokenizer, folder: str | os.PathLike, model_max_length: int,
                      eos: str | None = None, chat_template: str | None = None) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`.

    `AutoTokenizer.from_pretrained(folder)` then returns a `PreTrainedTokenizerFast` whose ids equal `tok`'s.
    No bos is prepended (the project never adds one) and decoding leaves spaces alone
    (`clean_up_tokenization_spaces` false), so `decode` is the project's byte-exact decode.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = build_hf_tokenizer(tok)
    roles = special_roles(tok, eos)
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "llm_dist_tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint()},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    paths = [folder / "tokenizer.json", folder / "tokenizer_config.json", folder / "special_tokens_map.json"]
    hf.save(str(paths[0]))
    paths[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[2].write_text(json.dumps(roles, indent=2) + "\n", encoding="utf-8")
    return paths
