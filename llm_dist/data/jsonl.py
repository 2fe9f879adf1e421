"""Reading small JSONL files of examples (SFT rows, preference pairs, multiple-choice questions) with errors
that name the file and line. Large corpora stream through `llm_dist/data/sources.py` instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Iterator


def utf8_lines(f: IO[bytes], where: str, error: type[Exception]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a binary stream; bytes that are not UTF-8 raise `error` with one
    line naming `where`, the line and the byte offset in the (decompressed) file."""
    offset = 0  # byte offset of the current line
    for n, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}:{n}: not valid UTF-8 ({e.reason} at byte offset {offset + e.start} of the file: "
                        f"{raw[e.start:e.start + 1].hex()!r}); expected UTF-8 JSON lines") from None
        offset += len(raw)
        yield n, line


def read_jsonl_rows(path: str | Path, error: type[Exception] = ValueError, limit: int = 0) -> list[tuple[object, str]]:
    """(parsed row, "file:line") for each non-blank line, at most `limit` (0 = all). Raises `error` with one
    line for a missing file, bytes that are not UTF-8 (with their byte offset), invalid JSON or a file with no rows."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{path}: file not found")
    rows: list[tuple[object, str]] = []
    with p.open("rb") as f:
        for n, line in utf8_lines(f, str(path), error):
            if not line.strip():
                continue
            try:
                rows.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise error(f"{path}: no rows")
    return rows
