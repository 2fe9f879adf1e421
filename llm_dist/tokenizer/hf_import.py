"""A Hugging Face `tokenizers` tokenizer (a model folder's tokenizer.json) behind llm_dist's `Tokenizer`.

    tok = load_hf_tokenizer("path/to/hf-model")     # tokenizer.json (+ tokenizer_config.json for bos/eos)
    tok.save("run/hf_tokenizer.json")               # one self-contained file; load_tokenizer reads it back

Runs in the `tokenizers` Rust library (optional dependency: `pip install tokenizers`, or llm_dist[hf]); it
is imported only when such a tokenizer is used. Differences from HF's `tokenizer(text)` on purpose:

* no BOS/EOS is added (`add_special_tokens=False`): llm_dist's data, chat template and sampler place
  their own separators;
* `encode_ordinary` encodes special-token strings in the text as plain text, like tiktoken's;
* the document separator (`eot_id`) is the model's eos token (tokenizer_config.json `eos_token`, else
  `<|endoftext|>`), since Llama/Qwen-style vocabularies may have no `<|endoftext|>`.

Saved-file format (`save` / `load_hf_tokenizer_file`; in checkpoints it is `hf_tokenizer.json`): one UTF-8
JSON object

    {"format": "llm_dist.hf_tokenizer", "version": 1, "name": "...", "bos_token": "<s>" | null,
     "eos_token": "</s>", "tokenizer": {...HF tokenizer.json, added tokens included...}}

It is parsed as JSON and handed to `tokenizers.Tokenizer.from_str`; nothing is executed or unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable

from llm_dist.tokenizer.base import EOT, Tokenizer
from llm_dist.tokenizer.bpe import TokenizerFileError
from llm_dist.tokenizer.gpt2 import bytes_to_unicode

FORMAT = "llm_dist.hf_tokenizer"
VERSION = 1
HEADER = '{"format": "' + FORMAT + '"'  # how a saved file starts: `load_tokenizer` recognises it by this


def _tokenizers_module():  # noqa: ANN202 - the optional `tokenizers` package
    try:
        import tokenizers
    except ImportError:
        raise TokenizerFileError("tokenizer", "Hugging Face tokenizers need the 'tokenizers' package "
                                 "(pip install tokenizers)") from None
    return tokenizers


def _uses_byte_level(node: object) -> bool:
    """Whether a tokenizer.json `decoder` is (or contains) the ByteLevel decoder."""
    if isinstance(node, dict):
        if node.get("type") == "ByteLevel":
            return True
        return any(_uses_byte_level(d) for d in node.get("decoders") or ())
    return False


def _token_content(value: object) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from its JSON) with the model's bos/eos; see the module docstring."""

    def __init__(self, tokenizer_json: str, name: str, eos_token: str | None, bos_token: str | None = None,
                 where: str = "tokenizer") -> None:
        tk = _tokenizers_module()
        try:
            self._tok = tk.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # noqa: BLE001 - the Rust parser's own message, whatever the problem
            raise TokenizerFileError(where, f"not a Hugging Face tokenizer.json ({' '.join(str(e).split())[:160]})") from None
        self._tok.encode_special_tokens = True  # encode_ordinary: special-token strings are plain text
        self._tok.no_padding()
        self._tok.no_truncation()
        self.name = name
        self._json = tokenizer_json
        added = self._tok.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        if eos_token is None and EOT in vocab:
            eos_token = EOT
        for role, tok in (("eos_token", eos_token), ("bos_token", bos_token)):
            if tok is not None and tok not in vocab:
                raise TokenizerFileError(where, f"{role} {tok!r} is not in the vocabulary")
        if eos_token is None:
            raise TokenizerFileError(where, "no eos_token (tokenizer_config.json) and no <|endoftext|> token; "
                                     "expected one to separate documents")
        self.eos_token, self.bos_token = eos_token, bos_token
        self._eos_id = vocab[eos_token]
        self._byte_level = _uses_byte_level(json.loads(tokenizer_json).get("decoder"))

    # ------------------------------------------------------------------------------------- interface

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        """The eos token's id: the document separator and the sampler's stop token."""
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode_ordinary over many texts in the Rust library's thread pool."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Byte-level vocabularies (GPT-2, Llama 3, Qwen2): the exact bytes, token by token, so a piece of a
        multi-byte character keeps its bytes. Others (SentencePiece-style): the library's decoded text.

        Ids past the tokenizer's vocabulary decode to nothing, as in transformers: HF models often have more
        embedding rows than tokens (Qwen2.5: 151936 rows, 151665 tokens), and a sampler may pick one.
        """
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if i < 0), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.name!r} ({self._vocab_size} ids)")
        ids = [i for i in ids if i < self._vocab_size]
        if not self._byte_level:
            return self._tok.decode(ids, skip_special_tokens=False).encode("utf-8")
        return b"".join(self._piece(i) for i in ids)

    def _piece(self, i: int) -> bytes:
        piece = self._pieces.get(i)
        if piece is None:
            tok = self._tok.id_to_token(i)
            if tok is None:
                piece = b""
            elif i in self._added_ids:
                piece = tok.encode("utf-8")
            else:
                piece = bytes(self._unicode_to_byte[c] for c in tok if c in self._unicode_to_byte)
            self._pieces[i] = piece
        return piece

    @cached_property
    def _pieces(self) -> dict[int, bytes]:
        return {}

    @cached_property
    def _added_ids(self) -> set[int]:
        return set(self._tok.get_added_tokens_decoder())

    @cached_property
    def _unicode_to_byte(self) -> dict[str, int]:
        return {c: b for b, c in bytes_to_unicode().items()}

    @cached_property
    def _definition(self) -> dict:
        # The tokenizer JSON is summarised by a sha256 of its canonical form (sorted keys), so fingerprints
        # stay cheap to store for 150k-token vocabularies; the name is left out as for BPETokenizer.
        canon = json.dumps(json.loads(self._tok.to_str()), sort_keys=True, separators=(",", ":"))
        return {"type": "hf", "tokenizer_sha256": hashlib.sha256(canon.encode()).hexdigest(),
                "vocab_size": self._vocab_size, "special_tokens": self.special_tokens,
                "eos_token": self.eos_token, "bos_token": self.bos_token}

    def definition(self) -> dict:
        return self._definition

    # ------------------------------------------------------------------------------- growing, saving

    def with_special_tokens(self, tokens: Iterable[str], name: str | None = None) -> HFTokenizer:
        """A copy with `tokens` added as special tokens after the highest id (existing ones are reused)."""
        tk = _tokenizers_module()
        tok = tk.Tokenizer.from_str(self._tok.to_str())
        tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in tokens])
        return HFTokenizer(tok.to_str(), name or self.name, self.eos_token, self.bos_token)

    def hf_json(self) -> str:
        """The wrapped HF tokenizer.json (added tokens included), as `tokenizers` serialises it."""
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write the one-file format of the module docstring (atomically: a temp file, then a rename)."""
        path = Path(path)
        head = json.dumps({"format": FORMAT, "version": VERSION, "name": self.name, "bos_token": self.bos_token,
                           "eos_token": self.eos_token})
        # The HF JSON is embedded as it is (no re-serialisation), after the small header fields.
        text = head[:-1] + ', "tokenizer": ' + self._tok.to_str() + "}\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def is_hf_tokenizer_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file written by `HFTokenizer.save` (it starts with the format header)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(HEADER)) == HEADER.encode()
    except OSError:
        return False


def load_hf_tokenizer_file(path: str | os.PathLike) -> HFTokenizer:
    """Load a file written by `HFTokenizer.save`; TokenizerFileError (one line) naming the file if malformed."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(path, f"unreadable ({type(e).__name__}); expected a {FORMAT} file") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version") != VERSION:
        raise TokenizerFileError(path, f"expected format {FORMAT!r} version {VERSION}")
    if not isinstance(obj.get("tokenizer"), dict) or not isinstance(obj.get("name"), str):
        raise TokenizerFileError(path, "expected a 'tokenizer' object and a string 'name'")
    for key in ("eos_token", "bos_token"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise TokenizerFileError(path, f"{key!r} must be a string or null")
    return HFTokenizer(json.dumps(obj["tokenizer"]), obj["name"], obj.get("eos_token"), obj.get("bos_token"),
                       where=str(path))


def load_hf_tokenizer(folder: str | os.PathLike, name: str | None = None) -> HFTokenizer:
    """The tokenizer of an HF model folder: tokenizer.json, with bos/eos from tokenizer_config.json (else
    from config.json's bos/eos_token_id, else `<|endoftext|>`)."""
    folder = Path(folder)
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not tj.is_file():
        raise TokenizerFileError(tj, "not found; expected the model's fast tokenizer (tokenizer.json)")
    try:
        text = tj.read_text(encoding="utf-8")
        conf = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(tc if tc.is_file() else tj, f"unreadable ({type(e).__name__})") from None
    if not isinstance(conf, dict):
        raise TokenizerFileError(tc, "expected a JSON object")
    eos, bos = _token_content(conf.get("eos_token")), _token_content(conf.get("bos_token"))
    if eos is None or bos is None:  # older folders: the ids in config.json, mapped through the vocabulary
        eos, bos = _ids_from_model_config(folder, text, eos, bos)
    return HFTokenizer(text, name or _folder_name(folder), eos, bos, where=str(tj))


def _folder_name(folder: Path) -> str:
    """'hf:<folder>', or 'hf:org/name' for a hub cache snapshot (models--org--name/snapshots/<hash>)."""
    repo = folder.resolve().parent.parent.name
    if folder.resolve().parent.name == "snapshots" and repo.startswith("models--"):
        return "hf:" + repo.removeprefix("models--").replace("--", "/")
    return f"hf:{folder.name}"


def _ids_from_model_config(folder: Path, tokenizer_json: str, eos: str | None, bos: str | None
                           ) -> tuple[str | None, str | None]:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return eos, bos
    tk = _tokenizers_module()
    tok = tk.Tokenizer.from_str(tokenizer_json)

    def name_of(key: str) -> str | None:
        v = cfg.get(key) if isinstance(cfg, dict) else None
        v = v[0] if isinstance(v, list) and v else v  # Llama 3 lists several eos ids: the first is the text end
        return tok.id_to_token(v) if isinstance(v, int) and not isinstance(v, bool) else None

    return eos or name_of("eos_token_id"), bos or name_of("bos_token_id")
