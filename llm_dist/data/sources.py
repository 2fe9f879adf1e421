"""Input side of data preparation: resolve paths/globs/URLs/folders with fsspec and pick each file's reader.

Every input resolves to `SourceFile`s whose `kind` says how documents come out of it (llm_dist/data/formats.py
decides, by magic bytes, then name, then a UTF-8 sniff; llm_dist/data/readers.py reads):
- text: one file is one document.
- jsonl: one line is one document, its text under `text_field` (optionally gzip/zstd compressed).
- parquet / arrow: one row is one document, its text in the `text_field` column; a `datasets`
  `save_to_disk` folder stands for its data-*.arrow files (in the row order its state.json lists).

Everything is opened through fsspec, so local paths, `file://`, `s3://`, `gs://`, `https://` ... all work
wherever the matching fsspec backend is installed; `hf://` Hub URLs are refused (download first).
Bad input raises `DataPrepError` with one line naming the file, line and key at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, Sequence

from fsspec.core import url_to_fs

from llm_dist.data.errors import DataPrepError
from llm_dist.data.formats import (
    DATASETS_DICT,
    DATASETS_INFO,
    DATASETS_STATE,
    compression_of,
    datasets_folder_files,
    detect_kind,
    forced_kind,
    refuse_url_scheme,
    unsupported,
)
from llm_dist.data.readers import check_columns, iter_documents, read_head, read_text_chunks

__all__ = ["DataPrepError", "SourceFile", "resolve_sources", "read_text_chunks", "read_text_file",
           "source_documents", "check_source_columns", "split_at_safe_boundary"]
_HEAD_BYTES = 1 << 16


@dataclass(frozen=True)
class SourceFile:
    """One resolved input file. `size`/`mtime` identify its version so a re-run can tell "same input"."""

    url: str  # plain absolute path for local files, protocol-qualified URL otherwise
    kind: str  # text | jsonl | parquet | arrow
    size: int | None
    mtime: str | None
    codec: str | None = None  # compression of a text/JSONL file (gzip, zstd, ...), found from its bytes

    def to_json(self) -> dict:
        # The codec follows from the bytes, which size/mtime already pin: left out so recipes of data
        # prepared before it was recorded still match.
        return {"url": self.url, "kind": self.kind, "size": self.size, "mtime": self.mtime}


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _mtime(info: dict) -> str | None:
    # Backends disagree on the key; any stable string that changes when the file changes will do.
    for key in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag"):
        if info.get(key) is not None:
            return str(info[key])
    return None


def resolve_sources(sources: str | Sequence[str], input_format: str = "auto", detect: bool = True
                    ) -> list[SourceFile]:
    """Expand globs (sorted, so the order is reproducible), stat every file and pick its reader; errors
    name the culprit. `input_format` "auto" detects each file's kind; a kind name forces it.
    `detect=False` only stats (kind "unknown"): for comparing sizes without reading every file's head."""
    forced = forced_kind(input_format)
    specs = [sources] if isinstance(sources, str) else list(sources)
    if not specs:
        raise DataPrepError("no inputs given")
    out: list[SourceFile] = []
    for spec in specs:
        spec = str(spec)
        refuse_url_scheme(spec)
        try:
            out.extend(_resolve_one(spec, forced, detect))
        except DataPrepError:
            raise
        except Exception as e:  # no backend for the URL (s3fs...), bad URL, I/O or network error
            raise DataPrepError(f"{spec}: cannot open it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                ) from None
    return out


def _resolve_one(spec: str, forced: str | None, detect: bool) -> list[SourceFile]:
    fs, path = url_to_fs(spec)
    if _has_magic(path):
        paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        if not paths:
            raise DataPrepError(f"{spec}: no input files match this glob")
    else:
        if not fs.exists(path):
            raise DataPrepError(f"{spec}: input file not found")
        paths = _folder_files(fs, path, spec) if fs.isdir(path) else [path]
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    out = []
    for p in paths:
        info = fs.info(p)
        url = p if local else fs.unstrip_protocol(p)
        size = info.get("size")
        kind, codec = _kind_of(url, size, forced) if detect else ("unknown", None)
        out.append(SourceFile(url=url, kind=kind, size=size, mtime=_mtime(info), codec=codec))
    return out


def _folder_files(fs, path: str, spec: str) -> list[str]:  # noqa: ANN001 - any fsspec filesystem
    """A `datasets` save_to_disk folder -> its data files; any other folder is refused with a hint."""
    base = path.rstrip("/")
    if fs.exists(f"{base}/{DATASETS_STATE}"):
        try:
            state = json.loads(fs.cat_file(f"{base}/{DATASETS_STATE}"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataPrepError(f"{spec}/{DATASETS_STATE}: not valid JSON ({e})") from None
        files = datasets_folder_files(base, state)
        for f in files:
            if not fs.exists(f):
                raise DataPrepError(f"{f}: listed in {spec}/{DATASETS_STATE} but missing")
        return files
    if fs.exists(f"{base}/{DATASETS_DICT}"):
        splits = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(base, detail=False) if fs.isdir(p))
        raise DataPrepError(f"{spec}: a datasets DatasetDict folder (splits: {', '.join(splits) or 'none'}); pass "
                            f"one split's folder, e.g. {spec.rstrip('/')}/{splits[0] if splits else 'train'}")
    if fs.exists(f"{base}/{DATASETS_INFO}"):
        raise DataPrepError(f"{spec}: has {DATASETS_INFO} but no {DATASETS_STATE}; expected a folder written by "
                            "datasets' save_to_disk")
    raise unsupported(spec, f"is a directory, not a datasets save_to_disk folder; pass its files or a glob such as "
                            f"'{spec.rstrip('/')}/*.parquet'")


def _kind_of(url: str, size: int | None, forced: str | None) -> tuple[str, str | None]:
    head = read_head(url, _HEAD_BYTES)
    codec = compression_of(url, head) if not head.startswith((b"PAR1", b"ARROW1")) else None
    if forced is not None:
        return forced, (codec if forced in ("text", "jsonl") else None)
    decompressed = read_head(url, _HEAD_BYTES, codec) if codec else None
    return detect_kind(url, head, size, decompressed), codec


def read_text_file(url: str, codec: str | None = None) -> str:
    """The whole file as one string (a document in multi-file mode)."""
    return "".join(read_text_chunks(url, 1 << 24, codec))


def source_documents(src: SourceFile, text_field: str) -> Iterator[tuple[str, float]]:
    """(document, fraction of `src` read) for every document of one input file."""
    return iter_documents(src.url, src.kind, text_field, src.codec, src.size)


def check_source_columns(sources: Sequence[SourceFile], text_field: str) -> None:
    """Check the text column of the first parquet and first Arrow file (cheap: schema only) before any
    output exists; the others are checked as they are read."""
    seen: set[str] = set()
    for src in sources:
        if src.kind in ("parquet", "arrow") and src.kind not in seen:
            seen.add(src.kind)
            check_columns(src.url, src.kind, text_field)


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
