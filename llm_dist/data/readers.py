"""Documents out of one input file, streamed: text, JSONL (plain or compressed), parquet, Arrow IPC.

`iter_documents(src, text_field)` yields `(text, fraction)` pairs: one document and how much of the file
has been read after it (0..1, for the progress line's percentage and ETA). Nothing reads a whole file into
memory: JSONL goes line by line, parquet row group by row group in record batches of `BATCH_ROWS` rows of
the one text column (`ParquetFile.iter_batches(columns=[text_field])`), Arrow IPC batch by batch.
pyarrow (parquet, arrow) and zstandard (.zst) are the optional `data` extra; without them the error
says what to install. Bad input raises `DataPrepError` with one line naming the file, row/line and key.
"""

from __future__ import annotations

import codecs
import io
import json
from typing import Any, Iterator

from fsspec.core import url_to_fs

from llm_dist.data.errors import DataPrepError
from llm_dist.data.jsonl import utf8_lines

BATCH_ROWS = 1024  # parquet/arrow rows converted to Python strings at a time (FineWeb-Edu: ~3 MB of text)
_STRING_TYPES = ("string", "large_string", "string_view")


def import_pyarrow(url: str) -> Any:
    """pyarrow (+ pyarrow.parquet), or a one-line DataPrepError saying how to install it."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataPrepError(f"{url}: reading parquet/Arrow needs pyarrow: pip install pyarrow "
                            "(or pip install 'llm_dist[data]')") from None
    return pyarrow


def _open_raw(url: str) -> Any:
    """A binary file object on the stored bytes (no decompression)."""
    fs, path = url_to_fs(url)
    return fs.open(path, "rb")


def _decompressed(raw: Any, codec: str | None, url: str) -> Any:
    if codec is None:
        return raw
    if codec == "zstd":
        try:
            import zstandard
        except ImportError:
            raise DataPrepError(f"{url}: reading .zst files needs zstandard: pip install zstandard "
                                "(or pip install 'llm_dist[data]')") from None
        # read_across_frames: files written by several zstd frames (pzstd, appended chunks) read whole.
        # Buffered: the zstd reader is a raw stream without readline, which line iteration needs.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), 1 << 20)
    from fsspec.compression import compr
    return compr[codec](raw, mode="rb")


def read_head(url: str, n: int, codec: str | None = None) -> bytes:
    """The first `n` bytes of the file, decompressed with `codec` when given."""
    with _open_raw(url) as raw:
        f = _decompressed(raw, codec, url)
        try:
            return f.read(n)
        except Exception as e:  # a corrupt gzip/zstd header: name the file rather than the codec's internals
            raise DataPrepError(f"{url}: cannot decompress it as {codec} ({type(e).__name__}: {e})") from None


def _fraction(raw: Any, size: int | None) -> float:
    try:
        return min(raw.tell() / size, 1.0) if size else 0.0
    except (OSError, ValueError):
        return 0.0


# ---------------------------------------------------------------------------------------------------------
# text and JSONL

def read_text_chunks(url: str, chunk_chars: int, codec: str | None = None) -> Iterator[str]:
    """Stream a UTF-8 text file in pieces of `chunk_chars` characters, newlines kept byte-exact."""
    # Bytes are decoded here (not by a text wrapper) so that a bad byte is reported at its offset in the file;
    # nothing is translated, so "\r\n" stays as is: the prepared tokens encode exactly the file's text.
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0  # bytes read so far
    with _open_raw(url) as raw:
        f = _decompressed(raw, codec, url)
        while True:
            data = f.read(chunk_chars)
            pending = len(decoder.getstate()[0])  # bytes of a split character held from the previous read
            try:
                piece = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise DataPrepError(f"{url}: not valid UTF-8 ({e.reason} at byte offset {pos - pending + e.start} "
                                    "of the file); expected UTF-8 text") from None
            pos += len(data)
            if piece:
                yield piece
            if not data:
                return


def iter_jsonl(url: str, text_field: str, codec: str | None, size: int | None) -> Iterator[tuple[str, float]]:
    """(obj[text_field], fraction read) for each non-blank line; a one-line error for any malformed line."""
    with _open_raw(url) as raw:
        f = _decompressed(raw, codec, url)
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
            yield text, _fraction(raw, size)


# ---------------------------------------------------------------------------------------------------------
# parquet and Arrow IPC

def _text_column_index(schema: Any, url: str, text_field: str) -> int:
    names = list(schema.names)
    if text_field not in names:
        cols = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise DataPrepError(f"{url}: no {text_field!r} column (columns: {cols or 'none'}); set --text-field "
                            "(data.text_field when training)")
    i = names.index(text_field)
    tp = schema.field(i).type
    if str(tp) not in _STRING_TYPES:
        raise DataPrepError(f"{url}: column {text_field!r} is {tp}, expected a string column")
    return i


def _batch_texts(column: Any) -> Iterator[str]:
    # Null rows are documents without text: skipped like empty ones.
    for text in column.to_pylist():
        if text is not None:
            yield text


def _parquet_file(url: str, raw: Any) -> Any:
    pa = import_pyarrow(url)
    try:
        return pa.parquet.ParquetFile(raw)
    except (pa.ArrowException, OSError) as e:
        raise DataPrepError(f"{url}: unreadable parquet file ({type(e).__name__}: {e})") from None


def iter_parquet(url: str, text_field: str) -> Iterator[tuple[str, float]]:
    """Row groups streamed as record batches of BATCH_ROWS rows of the text column only."""
    pa = import_pyarrow(url)
    with _open_raw(url) as raw:
        pf = _parquet_file(url, raw)
        _text_column_index(pf.schema_arrow, url, text_field)
        total = max(pf.metadata.num_rows, 1)
        done = 0
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[text_field], use_threads=False):
                done += batch.num_rows
                frac = done / total
                for text in _batch_texts(batch.column(0)):
                    yield text, frac
        except (pa.ArrowException, OSError) as e:
            raise DataPrepError(f"{url}: unreadable parquet data ({type(e).__name__}: {e})") from None


def _open_ipc(url: str, raw: Any) -> tuple[Any, int | None]:
    """(reader, number of batches) for an IPC file, (stream reader, None) for an IPC stream."""
    pa = import_pyarrow(url)
    head = raw.read(6)
    raw.seek(0)
    try:
        if head == b"ARROW1":
            reader = pa.ipc.open_file(raw)
            return reader, reader.num_record_batches
        return pa.ipc.open_stream(raw), None
    except (pa.ArrowException, OSError) as e:
        raise DataPrepError(f"{url}: unreadable Arrow IPC data ({type(e).__name__}: {e})") from None


def iter_arrow(url: str, text_field: str, size: int | None) -> Iterator[tuple[str, float]]:
    """Arrow IPC file or stream (a `datasets` data-*.arrow file), one record batch at a time."""
    pa = import_pyarrow(url)
    with _open_raw(url) as raw:
        reader, n_batches = _open_ipc(url, raw)
        col = _text_column_index(reader.schema, url, text_field)
        try:
            if n_batches is not None:
                for b in range(n_batches):
                    batch = reader.get_batch(b)
                    for lo in range(0, batch.num_rows, BATCH_ROWS):
                        frac = min(lo + BATCH_ROWS, batch.num_rows) / batch.num_rows * (b + 1) / n_batches
                        for text in _batch_texts(batch.column(col).slice(lo, BATCH_ROWS)):
                            yield text, frac
            else:
                for batch in reader:
                    frac = _fraction(raw, size)
                    for text in _batch_texts(batch.column(col)):
                        yield text, frac
        except (pa.ArrowException, OSError) as e:
            raise DataPrepError(f"{url}: unreadable Arrow IPC data ({type(e).__name__}: {e})") from None


def check_columns(url: str, kind: str, text_field: str) -> None:
    """For parquet/Arrow: fail now (before any output exists) if the text column is missing or not strings."""
    if kind not in ("parquet", "arrow"):
        return
    with _open_raw(url) as raw:
        if kind == "parquet":
            schema = _parquet_file(url, raw).schema_arrow
        else:
            schema = _open_ipc(url, raw)[0].schema
        _text_column_index(schema, url, text_field)


def iter_documents(url: str, kind: str, text_field: str, codec: str | None = None, size: int | None = None
                   ) -> Iterator[tuple[str, float]]:
    """(document, fraction of the file read) for any readable kind; a text file is a single document."""
    if kind == "jsonl":
        yield from iter_jsonl(url, text_field, codec, size)
    elif kind == "parquet":
        yield from iter_parquet(url, text_field)
    elif kind == "arrow":
        yield from iter_arrow(url, text_field, size)
    else:
        yield "".join(read_text_chunks(url, 1 << 24, codec)), 1.0

