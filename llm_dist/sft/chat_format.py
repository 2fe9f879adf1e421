"""Chat formats: how a conversation becomes text and token ids, each format defined once.

A format is a handful of pieces; everything else (token ids + loss mask for SFT, the prompt/response split
of reward and preference data, RL and chat generation prompts, the stop token, and the Hugging Face Jinja
`chat_template` a checkpoint is exported with) is derived from them here, so the variants cannot drift:

    begin                               once, before the first message
    header(role) content end footer     per message (content stripped first when `strip_content`)
    header("assistant")                 the generation prompt

`project` (this project's own, the default):

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

`chatml` (Qwen's ChatML; a system message is rendered only when the conversation has one: Qwen2.5's
stock template would add "You are Qwen, created by Alibaba Cloud..." when none is given, which is a
model-specific prompt, not part of the format; give it explicitly to reproduce Qwen2.5 exactly):

    <|im_start|>system\\nYou are terse.<|im_end|>\\n<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n

`llama3` (Meta Llama 3 Instruct; content stripped of surrounding whitespace, as Meta's template does):

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n4<|eot_id|>

Loss mask: only the assistant messages' content and their end-of-turn token are targets (the model learns
to answer and to stop); headers, footers, `begin` and other roles' messages are context. Generation stops at
the end-of-turn token. Template pieces that are special tokens encode to their ids; message content is
encoded with `encode_ordinary`, so a user typing "<|im_end|>" gets plain text, never the control token (the
only way the ids can differ from tokenizing the rendered text with specials allowed). Pieces are encoded
one by one, so a loss-mask boundary is always a token boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_dist.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def _jinja_literal(s: str) -> str:
    """`s` as a single-quoted Jinja string literal (Jinja unescapes \\\\, \\' and \\n like Python)."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


@dataclass(frozen=True)
class ChatFormat:
    """One chat format: its special tokens and pieces, and every rendering derived from them."""

    name: str
    special_tokens: tuple[str, ...]  # added to a tokenizer lacking them, in this order (ids follow the last id)
    end_token: str  # closes every message; trained after assistant content; generation stops at it
    header: tuple[str, ...]  # pieces opening a message; "{role}" in a piece is replaced by the role
    begin: tuple[str, ...] = ()  # pieces before the first message
    footer: tuple[str, ...] = ()  # pieces after end_token (context, not trained)
    strip_content: bool = False  # message content is stripped of surrounding whitespace first

    # ------------------------------------------------------------------------------------------ text
    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """End-of-turn strings generation stops at (an exported tokenizer's eos)."""
        return (self.end_token,)

    def content(self, text: str) -> str:
        """Message content as the format writes it."""
        return text.strip() if self.strip_content else text

    def _header(self, role: str) -> tuple[str, ...]:
        if role not in ROLES:
            raise ValueError(f"chat format {self.name}: unknown role {role!r} (expected {', '.join(ROLES)})")
        return tuple(p.replace("{role}", role) for p in self.header)

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The rendered conversation as text (what the Jinja template renders for the same input)."""
        parts = list(self.begin)
        for m in messages:
            parts += [*self._header(m["role"]), self.content(m["content"]), self.end_token, *self.footer]
        if add_generation_prompt:
            parts += self._header("assistant")
        return "".join(parts)

    # ------------------------------------------------------------------------------------------ ids
    def missing_tokens(self, tok: Tokenizer) -> list[str]:
        """This format's special tokens the tokenizer does not have."""
        return [t for t in self.special_tokens if t not in tok.special_tokens]

    def _piece_ids(self, tok: Tokenizer, piece: str) -> list[int]:
        if piece in self.special_tokens:
            if piece not in tok.special_tokens:
                raise ValueError(f"chat format {self.name}: tokenizer {tok.name} has no {piece} token "
                                 f"(missing {', '.join(self.missing_tokens(tok))})")
            return [tok.special_tokens[piece]]
        return tok.encode_ordinary(piece)

    def _pieces_ids(self, tok: Tokenizer, pieces: tuple[str, ...]) -> list[int]:
        return [i for p in pieces for i in self._piece_ids(tok, p)]

    def end_id(self, tok: Tokenizer) -> int:
        """Id of the end-of-turn token (the stop id of generation, the pad id of the stages' batches)."""
        return self._piece_ids(tok, self.end_token)[0]

    def stop_ids(self, tok: Tokenizer) -> list[int]:
        """Ids of `stop_tokens`."""
        return [self._piece_ids(tok, t)[0] for t in self.stop_tokens]

    def render(self, tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and, per id, whether it is a loss-bearing (response) token."""
        ids = self._pieces_ids(tok, self.begin)
        mask = [False] * len(ids)
        for m in messages:
            head = self._pieces_ids(tok, self._header(m["role"]))
            body = self.response_ids(tok, m["content"])  # content + end-of-turn
            foot = self._pieces_ids(tok, self.footer)
            ids += head + body + foot
            mask += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(foot)
        return ids, mask

    def prompt_ids(self, tok: Tokenizer, messages: list[dict]) -> list[int]:
        """The generation prompt for the reply to `messages` (which must not end with the reply)."""
        ids, _ = self.render(tok, messages)
        return ids + self._pieces_ids(tok, self._header("assistant"))

    def response_ids(self, tok: Tokenizer, content: str) -> list[int]:
        """A reply's ids after `prompt_ids`: its content, then the end-of-turn token (what generation emits).

        prompt_ids(msgs) + response_ids(reply) + the footer's ids == render(msgs + [assistant reply]) ids.
        """
        return tok.encode_ordinary(self.content(content)) + [self.end_id(tok)]

    # ------------------------------------------------------------------------------------------ Jinja
    @property
    def jinja(self) -> str:
        """The Hugging Face `chat_template` (variables messages, add_generation_prompt) rendering exactly
        `render_text`. `begin` is written literally rather than as bos_token, so the text does not depend on
        which bos an exported tokenizer declares."""

        def expr(pieces: tuple[str, ...], role: str) -> str:
            terms = []
            for p in pieces:
                for k, chunk in enumerate(p.split("{role}")):
                    if k:
                        terms.append(role)
                    if chunk:
                        terms.append(_jinja_literal(chunk))
            return " + ".join(terms)

        content = "message['content'] | trim" if self.strip_content else "message['content']"
        turn = " + ".join(t for t in (expr(self.header, "message['role']"), f"({content})",
                                      expr((self.end_token, *self.footer), "")) if t)
        out = f"{{{{ {expr(self.begin, '')} }}}}" if self.begin else ""
        out += ("{% for message in messages %}"
                "{% if message['role'] not in " + repr(list(ROLES)) + " %}"
                "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
                f"{{{{ {turn} }}}}{{% endfor %}}")
        out += f"{{% if add_generation_prompt %}}{{{{ {expr(self._header('assistant'), '')} }}}}{{% endif %}}"
        return out


PROJECT = ChatFormat(
    name="project",
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    end_token="<|end|>",
    header=("<|{role}|>",),
)

CHATML = ChatFormat(
    name="chatml",
    special_tokens=("<|im_start|>", "<|im_end|>"),
    end_token="<|im_end|>",
    header=("<|im_start|>", "{role}\n"),
    footer=("\n",),
)

LLAMA3 = ChatFormat(
    name="llama3",
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    end_token="<|eot_id|>",
    header=("<|start_header_id|>", "{role}", "<|end_header_id|>", "\n\n"),
    begin=("<|begin_of_text|>",),
    strip_content=True,
)

FORMATS: dict[str, ChatFormat] = {f.name: f for f in (PROJECT, CHATML, LLAMA3)}


def chat_format(name: str) -> ChatFormat:
    """The format named by `chat.template` (project | chatml | llama3)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r} (expected {' | '.join(FORMATS)})") from None
