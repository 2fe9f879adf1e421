"""Which reader an input file (or folder) needs: magic bytes first, then the name, then a UTF-8 sniff.

Formats read (`FORMATS`):
- parquet  -- files starting with b"PAR1" (or named *.parquet); documents from one string column.
- arrow    -- Arrow IPC files (b"ARROW1") or streams (0xFFFFFFFF continuation marker; *.arrow), which is
              what a Hugging Face `datasets` `save_to_disk` folder holds (`data-*.arrow` + `state.json`).
- jsonl    -- *.jsonl / *.ndjson (also *.json whose first character is "{"), plain or gzip/zstd/bz2/xz
              compressed (compression by magic bytes: 1f8b gzip, 28b52ffd zstd).
- text     -- *.txt / *.md / *.rst, and anything else that starts as valid UTF-8 with no NUL byte (one
              file = one document).

Everything else (a CSV, random bytes, a zip, an `hf://` URL) is refused with one line that names these
formats, so a wrong file fails before anything is written rather than as "not valid UTF-8 at byte 7".
"""

from __future__ import annotations

from typing import Any

from llm_dist.data.errors import DataPrepError

KINDS = ("text", "jsonl", "parquet", "arrow")
FORMATS = ("parquet, Arrow IPC files/streams and `datasets` save_to_disk folders, JSONL (.jsonl/.ndjson, "
           "optionally .gz/.zst), and UTF-8 text")
_SNIFF_BYTES = 1 << 16

_COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_COMPRESSION_EXT = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
_JSONL_EXT = (".jsonl", ".ndjson")
# Named as text: read as text even when the sniff fails, so the reader names the bad byte's offset.
_TEXT_EXT = (".txt", ".text", ".md", ".rst")
# Named formats we could be handed but do not read: said by name rather than sniffed as "text".
_REFUSED_EXT = {".csv": "CSV", ".tsv": "TSV", ".zip": "zip", ".tar": "tar", ".tgz": "tar", ".pdf": "PDF",
                ".xlsx": "Excel", ".feather": "Feather", ".orc": "ORC", ".avro": "Avro", ".pkl": "pickle",
                ".pickle": "pickle", ".npy": "numpy", ".bin": "binary", ".safetensors": "safetensors"}
_REMOTE_HINT = ("download it first (e.g. `huggingface-cli download --repo-type dataset NAME --local-dir DIR`) and "
                "pass the local files")
DATASETS_STATE = "state.json"  # a `datasets` save_to_disk folder: lists its data-*.arrow files in order
DATASETS_INFO = "dataset_info.json"
DATASETS_DICT = "dataset_dict.json"  # a DatasetDict folder: one sub-folder per split


def unsupported(what: str, why: str) -> DataPrepError:
    """The one-line refusal: what was given, why it cannot be read, and what can."""
    return DataPrepError(f"{what}: {why}; readable inputs are {FORMATS}")


def refuse_url_scheme(spec: str) -> None:
    """Hub references cannot be read (no network on compute nodes, and a 31-frame traceback when offline)."""
    if spec.startswith(("hf://", "hf:/", "huggingface://")):
        raise unsupported(spec, f"Hugging Face Hub URLs are not read; {_REMOTE_HINT}")


def compression_of(name: str, head: bytes) -> str | None:
    """The compression codec by magic bytes, else by extension (None: not compressed)."""
    for magic, codec in _COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            return codec
    for ext, codec in _COMPRESSION_EXT.items():
        if name.lower().endswith(ext):
            return codec
    return None


def _inner_name(name: str) -> str:
    """The name without a compression extension: "a.jsonl.gz" -> "a.jsonl"."""
    low = name.lower()
    for ext in _COMPRESSION_EXT:
        if low.endswith(ext):
            return low[: -len(ext)]
    return low


def _ext(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[1] if "." in base else ""


def _looks_like_text(head: bytes, complete: bool) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        # A multi-byte character cut by the sniff window is fine; a bad byte anywhere else is not.
        return not complete and e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


def detect_kind(url: str, head: bytes, size: int | None, decompressed: bytes | None = None) -> str:
    """The reader for one file from its first bytes (`head`) and name; raises the one-line refusal.

    `decompressed`: the first bytes after decompression, for a compressed file (used to sniff text/JSON).
    """
    name = url.lower()
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1") or head.startswith(b"\xff\xff\xff\xff"):
        return "arrow"
    codec = compression_of(name, head)
    inner = _inner_name(name) if codec else name
    ext = _ext(inner)
    if codec is None:
        if ext == ".parquet":
            raise unsupported(url, "named .parquet but does not start with the parquet magic bytes 'PAR1'")
        if ext == ".arrow":
            raise unsupported(url, "named .arrow but is neither an Arrow IPC file nor stream")
    if ext in _REFUSED_EXT:
        raise unsupported(url, f"{_REFUSED_EXT[ext]} files are not read")
    body = decompressed if codec else head
    if ext in _TEXT_EXT:
        return "text"
    if ext in _JSONL_EXT and codec is None:  # named JSONL: its reader reports a bad byte at its line and offset
        return "jsonl"
    complete = size is not None and size <= len(head) and not codec
    if body is None or not _looks_like_text(body, complete):
        what = f"{codec}-compressed data that is not UTF-8 text" if codec else "binary data of unknown format"
        raise unsupported(url, f"{what} (first bytes {head[:8].hex()})")
    if ext in _JSONL_EXT or (ext == ".json" and body.lstrip()[:1] == b"{"):
        return "jsonl"
    if ext == ".json":
        raise unsupported(url, "a .json file that is not JSON lines (one object per line) is not read")
    return "text"


def forced_kind(input_format: str) -> str | None:
    """--format's value -> a fixed kind, or None for auto-detection."""
    if input_format == "auto":
        return None
    if input_format not in KINDS:
        raise DataPrepError(f"input format must be 'auto' or one of {', '.join(KINDS)}, got {input_format!r}")
    return input_format


def datasets_folder_files(folder: str, state: dict[str, Any]) -> list[str]:
    """The data-*.arrow files of a `datasets` save_to_disk folder, in row order, from its state.json."""
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not files or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                                          for f in files):
        raise DataPrepError(f"{folder}/{DATASETS_STATE}: no '_data_files' list of {{'filename': ...}} entries; "
                            "expected a folder written by datasets' save_to_disk")
    names = [f["filename"] for f in files]
    bad = [n for n in names if "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise DataPrepError(f"{folder}/{DATASETS_STATE}: data file name {bad[0]!r} points outside the folder")
    return [f"{folder.rstrip('/')}/{n}" for n in names]
