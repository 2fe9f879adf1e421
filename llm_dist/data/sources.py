"""Input side of data preparation: resolve paths/globs/URLs with fsspec and stream documents out of them.

Two kinds of input file:
- text  (anything not named *.jsonl / *.ndjson): one file is one document.
- jsonl (*.jsonl, *.ndjson, optionally compressed e.g. *.jsonl.gz): one line is one document, its text
  under `text_field`. Blank lines are skipped; every other line must be a JSON object with a string there.

Everything is opened through `fsspec.open` (compression inferred from the extension), so local paths,
`file://`, `s3://`, `gs://`, `https://` ... all work wherever the matching fsspec backend is installed.
Bad input raises `DataPrepError` with one line naming the file, line and key at fault.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import fsspec
from fsspec.core import url_to_fs
from fsspec.utils import infer_compression

from llm_dist.data.jsonl import utf8_lines

_JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataPrepError(ValueError):
    """Bad input for data preparation; the message is a single line naming the file/line/key at fault."""


@dataclass(frozen=True)
class SourceFile:
    """One resolved input file. `size`/`mtime` identify its version so a re-run can tell "same input"."""

    url: str  # plain absolute path for local files, protocol-qualified URL otherwise
    kind: str  # "text" or "jsonl"
    size: int | None
    mtime: str | None

    def to_json(self) -> dict:
        return asdict(self)


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _kind_of(url: str, input_format: str) -> str:
    if input_format in ("text", "jsonl"):
        return input_format
    name = url.lower()
    comp = infer_compression(name)
    if comp is not None:  # strip ".gz" etc. so "x.jsonl.gz" is jsonl
        name = name.rsplit(".", 1)[0]
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"


def _mtime(info: dict) -> str | None:
    # Backends disagree on the key; any stable string that changes when the file changes will do.
    for key in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def resolve_sources(sources: str | Sequence[str], input_format: str = "auto") -> list[SourceFile]:
    """Expand globs (sorted, so the order is reproducible) and stat every file; errors name the culprit."""
    if input_format not in ("auto", "text", "jsonl"):
        raise DataPrepError(f"input format must be 'auto', 'text' or 'jsonl', got {input_format!r}")
    specs = [sources] if isinstance(sources, str) else list(sources)
    if not specs:
        raise DataPrepError("no inputs given")
    out: list[SourceFile] = []
    for spec in specs:
        spec = str(spec)
        try:
            out.extend(_resolve_one(spec, input_format))
        except DataPrepError:
            raise
        except (ImportError, ValueError, OSError) as e:  # no backend for the URL (s3fs...), bad URL, I/O error
            raise DataPrepError(f"{spec}: cannot open it ({type(e).__name__}: {e})") from None
    return out


def _resolve_one(spec: str, input_format: str) -> list[SourceFile]:
    fs, path = url_to_fs(spec)
    if _has_magic(path):
        paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        if not paths:
            raise DataPrepError(f"{spec}: no input files match this glob")
    else:
        if not fs.exists(path):
            raise DataPrepError(f"{spec}: input file not found")
        if fs.isdir(path):
            raise DataPrepError(f"{spec}: is a directory; pass a glob such as '{spec.rstrip('/')}/*.txt'")
        paths = [path]
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    out = []
    for p in paths:
        info = fs.info(p)
        url = p if local else fs.unstrip_protocol(p)
        out.append(SourceFile(url=url, kind=_kind_of(url, input_format), size=info.get("size"), mtime=_mtime(info)))
    return out


def read_text_chunks(url: str, chunk_chars: int) -> Iterator[str]:
    """Stream a UTF-8 text file in pieces of `chunk_chars` characters, newlines kept byte-exact."""
    # Bytes are decoded here (not by a text wrapper) so that a bad byte is reported at its offset in the file;
    # nothing is translated, so "\r\n" stays as is: the prepared tokens encode exactly the file's text.
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0  # bytes read so far
    with fsspec.open(url, "rb", compression="infer") as f:
        while True:
            raw = f.read(chunk_chars)
            pending = len(decoder.getstate()[0])  # bytes of a split character held from the previous read
            try:
                piece = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataPrepError(f"{url}: not valid UTF-8 ({e.reason} at byte offset {pos - pending + e.start} "
                                    "of the file); expected UTF-8 text") from None
            pos += len(raw)
            if piece:
                yield piece
            if not raw:
                return


def read_text_file(url: str) -> str:
    """The whole file as one string (a document in multi-file mode)."""
    return "".join(read_text_chunks(url, 1 << 24))


def iter_jsonl_texts(url: str, text_field: str) -> Iterator[str]:
    """Yield `obj[text_field]` for each non-blank line; raise a one-line error for any malformed line."""
    with fsspec.open(url, "rb", compression="infer") as f:
        for lineno, line in utf8_lines(f, url, DataPrepError):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataPrepError(f"{url}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataPrepError(f"{url}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                keys = ", ".join(sorted(obj)[:8]) or "none"
                raise DataPrepError(f"{url}:{lineno}: no {text_field!r} field (keys: {keys}); set --text-field "
                                  "(data.text_field when training)")
            text = obj[text_field]
            if not isinstance(text, str):
                raise DataPrepError(
                    f"{url}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string"
                )
            yield text


def split_at_safe_boundary(buf: str) -> int:
    r"""Index just after the last lone newline ("X\nY", X and Y not whitespace), or -1 if there is none.

    Tokenizing `buf[:i]` and `buf[i:]` separately gives the same ids as tokenizing `buf` whole at such a
    cut, for byte-level and for GPT-2/cl100k-style BPE: in those pre-tokenizers no piece reaches across a
    newline into the non-whitespace character after it, and a piece ends at a lone newline between two
    non-whitespace characters whether or not any text follows it. (Cutting after "\n\n" is NOT
    safe: at the end of a string GPT-2's `\s+(?!\S)` takes "\n\n" as one piece, mid-text "\n" + "\n".)
    """
    end = len(buf) - 1  # the newline must have a following character we can inspect
    while True:
        i = buf.rfind("\n", 1, end)
        if i < 0:
            return -1
        if not buf[i + 1].isspace() and not buf[i - 1].isspace():
            return i + 1
        end = i
