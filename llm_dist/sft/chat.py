"""Chat tokens on a tokenizer, rendering in a chat format, reading SFT rows in the three accepted formats.

The formats themselves (`project`, the default, `chatml`, `llama3`) live in `llm_dist.sft.chat_format`;
the functions here take one (`fmt`, default `project`):

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

Only the assistant messages' content and their closing end-of-turn token carry loss (the model learns to
answer and to stop); everything else is context. Generation prompts end with the assistant header
(`<|assistant|>`) and stop at the end-of-turn token (`<|end|>`). Message text is encoded with
`encode_ordinary`, so a user typing "<|end|>" gets plain text, never the control token.

Rows (JSONL, one object per line): {"prompt", "response"}; {"messages": [{"role", "content"}, ...]}
(roles system | user | assistant, last one assistant); GSM8K's {"question", "answer"}.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from llm_dist.data.jsonl import read_jsonl_rows
from llm_dist.sft.chat_format import PROJECT, ChatFormat
from llm_dist.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer
from llm_dist.tokenizer.pretokenize import GPT2_PATTERN

SYSTEM, USER, ASSISTANT, END = PROJECT.special_tokens  # the project format's tokens
CHAT_TOKENS = PROJECT.special_tokens
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class DataError(ValueError):
    """A bad SFT/RL data row; the message is one line naming the file, the line and the key."""


def add_chat_tokens(tok: Tokenizer, fmt: ChatFormat = PROJECT) -> Tokenizer:
    """The tokenizer with the chat format's special tokens appended after its highest id (unchanged if it
    has them all: an imported tokenizer keeps its own ids for them).

    Ordinary text encodes to the same ids as before. A byte tokenizer becomes the equivalent BPE with the
    256 single bytes as its only ranks (identical ids), because a BPE tokenizer can be saved into a
    checkpoint as a file and reloaded with its extra specials; the builtin "byte" spec could not.
    """
    missing = fmt.missing_tokens(tok)
    if not missing:
        return tok
    suffix = "chat" if fmt is PROJECT else fmt.name  # "+chat": the name project checkpoints always had
    if isinstance(tok, HFTokenizer):  # a model's own vocabulary: the tokens are added to it (ids after the last)
        return tok.with_special_tokens(missing, f"{tok.name}+{suffix}")
    if isinstance(tok, ByteTokenizer):
        ranks, pattern, name = {bytes([b]): b for b in range(256)}, GPT2_PATTERN, f"byte+{suffix}"
    elif isinstance(tok, BPETokenizer):
        ranks, pattern, name = tok.mergeable_ranks, tok.pattern, f"{tok.name}+{suffix}"
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


def render(tok: Tokenizer, messages: list[dict], fmt: ChatFormat = PROJECT) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per id, whether it is a loss-bearing (response) token."""
    return fmt.render(tok, messages)


def prompt_ids(tok: Tokenizer, messages: list[dict], fmt: ChatFormat = PROJECT) -> list[int]:
    """The generation prompt for the reply to `messages` (which must not end with the reply)."""
    return fmt.prompt_ids(tok, messages)


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
