"""Chat template, its special tokens, and reading SFT rows in the three accepted formats.

Template (one special token per role, `<|end|>` closes every message):

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

Only the assistant messages' content and their closing `<|end|>` carry loss (the model learns to answer
and to stop); the role tokens and everything else are context. Generation prompts end with
`<|assistant|>` and stop at `<|end|>`. Message text is encoded with `encode_ordinary`, so a user typing
"<|end|>" gets plain text, never the control token.

Rows (JSONL, one object per line): {"prompt", "response"}; {"messages": [{"role", "content"}, ...]}
(roles system | user | assistant, last one assistant); GSM8K's {"question", "answer"}.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llm_dist.data.jsonl import read_jsonl_rows
from llm_dist.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer
from llm_dist.tokenizer.pretokenize import GPT2_PATTERN

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class DataError(ValueError):
    """A bad SFT/RL data row; the message is one line naming the file, the line and the key."""


def add_chat_tokens(tok: Tokenizer) -> Tokenizer:
    """The tokenizer with the chat special tokens appended after its highest id (unchanged if present).

    Ordinary text encodes to the same ids as before. A byte tokenizer becomes the equivalent BPE with the
    256 single bytes as its only ranks (identical ids), because a BPE tokenizer can be saved into a
    checkpoint as a file and reloaded with its extra specials; the builtin "byte" spec could not.
    """
    missing = [t for t in CHAT_TOKENS if t not in tok.special_tokens]
    if not missing:
        return tok
    if isinstance(tok, HFTokenizer):  # a model's own vocabulary: the tokens are added to it (ids after the last)
        return tok.with_special_tokens(missing, f"{tok.name}+chat")
    if isinstance(tok, ByteTokenizer):
        ranks, pattern, name = {bytes([b]): b for b in range(256)}, GPT2_PATTERN, "byte+chat"
    elif isinstance(tok, BPETokenizer):
        ranks, pattern, name = tok.mergeable_ranks, tok.pattern, f"{tok.name}+chat"
    else:
        raise TypeError(f"cannot add chat tokens to a {type(tok).__name__}")
    specials = dict(tok.special_tokens)
    nxt = tok.vocab_size  # ids are 0..vocab_size-1: the new ones follow every existing id
    for t in missing:
        specials[t] = nxt
        nxt += 1
    return BPETokenizer(name, pattern, ranks, specials)


@dataclass
class Conversation:
    """One training/eval row: its messages, and the optional curriculum difficulty."""

    messages: list[dict]  # [{"role": ..., "content": ...}, ...], last role assistant
    difficulty: float = 0.0
    where: str = ""  # "file:line" for error messages

    @property
    def reference(self) -> str:
        """The final assistant message: the reference answer for exact-match evaluation."""
        return self.messages[-1]["content"]


def _str_field(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise DataError(f"{where}: key {key!r} must be a string, got {type(v).__name__}")
    return v


def row_to_conversation(row: object, where: str, difficulty_field: str = "") -> Conversation:
    """Normalise one JSON row (any of the three formats) into a Conversation; DataError names the key."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: key 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS:
                raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLE_TOKENS)}")
            out.append({"role": m["role"], "content": _str_field(m, "content", f"{where}: messages[{i}]")})
        if out[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last of 'messages' must be an assistant message")
    elif "prompt" in row:
        out = [{"role": "user", "content": _str_field(row, "prompt", where)},
               {"role": "assistant", "content": _str_field(row, "response", where)}]
    elif "question" in row:
        out = [{"role": "user", "content": _str_field(row, "question", where)},
               {"role": "assistant", "content": _str_field(row, "answer", where)}]
    else:
        raise DataError(f"{where}: expected keys 'messages', 'prompt'+'response' or 'question'+'answer', "
                        f"got {sorted(row)[:6]}")
    diff = 0.0
    if difficulty_field and difficulty_field in row:
        d = row[difficulty_field]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d):
            raise DataError(f"{where}: key {difficulty_field!r} must be a finite number, got {d!r}")
        diff = float(d)
    return Conversation(out, diff, where)


def read_jsonl(path: str, difficulty_field: str = "") -> list[Conversation]:
    """Every row of a JSONL file as a Conversation (blank lines skipped)."""
    return [row_to_conversation(row, where, difficulty_field) for row, where in read_jsonl_rows(path, DataError)]


def render(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per id, whether it is a loss-bearing (response) token."""
    ids: list[int] = []
    mask: list[bool] = []
    end = tok.special_tokens[END]
    for m in messages:
        body = tok.encode_ordinary(m["content"]) + [end]
        ids.append(tok.special_tokens[ROLE_TOKENS[m["role"]]])
        mask.append(False)
        ids += body
        mask += [m["role"] == "assistant"] * len(body)
    return ids, mask


def prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The generation prompt for the reply to `messages` (which must not end with the reply)."""
    ids, _ = render(tok, messages)
    return ids + [tok.special_tokens[ASSISTANT]]


# ------------------------------------------------------------------------------------ answer checking

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm_number(s: str) -> str | None:
    """'1,234.50' -> '1234.5'; None if not a number."""
    s = s.replace(",", "").replace("$", "").strip()
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v.is_integer() else repr(v)


def extract_answer(text: str, mode: str) -> str | None:
    """The answer a response states: exact (the stripped text), gsm8k (the number after '####', commas
    stripped), last_number (the last number in the text). None when there is none."""
    if mode == "exact":
        return text.strip()
    if mode == "gsm8k":
        tail = text.rsplit("####", 1)
        if len(tail) < 2:
            return None
        m = _NUMBER.search(tail[1])
        return _norm_number(m.group()) if m else None
    if mode == "last_number":
        found = _NUMBER.findall(text)
        return _norm_number(found[-1]) if found else None
    raise ValueError(f"unknown answer mode {mode!r} (exact | gsm8k | last_number)")


def answers_match(prediction: str, reference: str, mode: str) -> bool:
    """True when the prediction states the reference's answer (extracted the same way from both)."""
    want = extract_answer(reference, mode)
    got = extract_answer(prediction, mode)
    return want is not None and got == want
