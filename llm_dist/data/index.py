"""On-disk format of prepared token data: raw token shards plus one JSON index, written crash-safely.

A prepared directory looks like

    out_dir/
      index.json            <- written last; its presence means "complete"
      train_000000.bin      <- raw little-endian uint16/uint32 tokens, no header
      train_000001.bin
      val_000000.bin

Shards are headerless so `np.memmap` can map them directly; the index says their dtype and token count,
and the loader checks every shard's byte size against it, so a truncated shard is caught at start-up.

Crash safety rests on two renames: a shard is written as `<name>.tmp.<pid>` and renamed when full, and the
index is written as `index.json.tmp.<pid>` and `os.replace`d only after every shard is in place. A run killed
at any point therefore leaves either no index (the directory is "not prepared") or the old complete one.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

INDEX_NAME = "index.json"
FORMAT_NAME = "llm_dist.tokens"
FORMAT_VERSION = 1
# Shard files belong to us iff they match this; `clean_prepared_dir` deletes nothing else.
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9]+)_(?P<num>\d{6})\.bin$")
_TMP_MARK = ".tmp."


class DataIndexError(RuntimeError):
    """A prepared directory is missing, incomplete, or does not match what the caller expects."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding ids 0..vocab_size-1: uint16 up to 65,536 ids, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")


def shard_name(split: str, num: int) -> str:
    """File name of shard `num` of `split`, e.g. train_000003.bin."""
    return f"{split}_{num:06d}.bin"


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed; not possible on every OS.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Appends tokens of one split into fixed-size shards, each renamed into place only when complete.

    Usage: `w = ShardWriter(dir, "train", np.uint16, 100_000_000); w.write(arr); ...; shards = w.close()`.
    `close()` returns the index entries `[{"file": ..., "tokens": ...}, ...]` of the finished shards.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: np.dtype | type, shard_tokens: int) -> None:
        if not re.fullmatch(r"[A-Za-z0-9]+", split):
            raise ValueError(f"split name must be alphanumeric, got {split!r}")
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict[str, Any]] = []
        self.total_tokens = 0
        self._file = None
        self._tmp_path: Path | None = None
        self._in_shard = 0  # tokens written to the currently open shard

    def write(self, tokens: np.ndarray) -> None:
        """Append a 1-D array of token ids (converted to the shard dtype; values are range-checked)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"ShardWriter.write expects a 1-D array, got shape {tokens.shape}")
        if tokens.size == 0:
            return
        if tokens.dtype != self.dtype:
            # A silent wrap-around (e.g. id 70000 stored as uint16) would corrupt training data undetectably.
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi > np.iinfo(self.dtype).max:
                raise ValueError(f"token ids span [{lo}, {hi}], which does not fit {self.dtype.name}")
            tokens = tokens.astype(self.dtype)
        pos = 0
        while pos < tokens.size:
            if self._file is None:
                self._open_next()
            take = min(self.shard_tokens - self._in_shard, tokens.size - pos)
            self._file.write(tokens[pos : pos + take].tobytes())
            self._in_shard += take
            self.total_tokens += take
            pos += take
            if self._in_shard == self.shard_tokens:
                self._finish_shard()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last (possibly short) shard and return the shard list for the index."""
        if self._file is not None:
            self._finish_shard()
        return list(self.shards)

    def abort(self) -> None:
        """Drop the shard being written (its temp file); finished shards stay for `clean_prepared_dir`."""
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._tmp_path is not None and self._tmp_path.exists():
                self._tmp_path.unlink()

    def _open_next(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp_path = self.out_dir / f"{name}{_TMP_MARK}{os.getpid()}"
        self._file = open(self._tmp_path, "wb")
        self._in_shard = 0

    def _finish_shard(self) -> None:
        assert self._file is not None and self._tmp_path is not None
        name = shard_name(self.split, len(self.shards))
        self._file.flush()
        os.fsync(self._file.fileno())  # contents durable before the name says "complete"
        self._file.close()
        self._file = None
        os.replace(self._tmp_path, self.out_dir / name)
        self.shards.append({"file": name, "tokens": self._in_shard})
        self._in_shard = 0


def make_index(
    dtype: np.dtype | type,
    vocab_size: int,
    eot_id: int,
    tokenizer: dict[str, Any],
    shard_tokens: int,
    splits: dict[str, dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """Assemble an index dict. `splits` maps split -> {"shards": [...], "tokens": n, ...}; `extra` is merged in."""
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": int(vocab_size),
        "eot_id": int(eot_id),
        "eot_after_each_document": True,
        "tokenizer": tokenizer,
        "shard_tokens": int(shard_tokens),
        "splits": splits,
        "total_tokens": int(sum(s["tokens"] for s in splits.values())),
        "created_unix": time.time(),
    }
    index.update(extra)
    return index


def write_token_dataset(
    out_dir: str | os.PathLike,
    splits: dict[str, Iterable[np.ndarray]],
    vocab_size: int,
    eot_id: int,
    shard_tokens: int,
    tokenizer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write already-tokenized streams (split -> iterable of 1-D id arrays) as a prepared dataset.

    For synthetic data (benchmarks, tests) and for callers with their own tokenization; `prepare_dataset`
    is the text front end. Same crash-safety: shards renamed when complete, index written last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_prepared_dir(out_dir)
    dtype = dtype_for_vocab(vocab_size)
    entries: dict[str, dict[str, Any]] = {}
    for split, arrays in splits.items():
        w = ShardWriter(out_dir, split, dtype, shard_tokens)
        try:
            for arr in arrays:
                w.write(arr)
            entries[split] = {"shards": w.close(), "tokens": w.total_tokens}
        except BaseException:
            w.abort()
            raise
    tok = tokenizer or {"name": "synthetic", "fingerprint": None, "spec": None, "definition": None}
    index = make_index(dtype, vocab_size, eot_id, tok, shard_tokens, entries)
    write_index(out_dir, index)
    return index


def write_index(out_dir: str | os.PathLike, index: dict[str, Any]) -> Path:
    """Atomically write `index.json` (temp file + fsync + os.replace); call only after all shards exist."""
    out_dir = Path(out_dir)
    final = out_dir / INDEX_NAME
    tmp = out_dir / f"{INDEX_NAME}{_TMP_MARK}{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(out_dir)
    return final


def read_index(data_dir: str | os.PathLike, verify_shards: bool = True) -> dict[str, Any]:
    """Load and validate `index.json`; with `verify_shards`, check each shard exists with the right size.

    Raises DataIndexError with a one-line reason if the directory is not a complete prepared dataset.
    """
    data_dir = Path(data_dir)
    path = data_dir / INDEX_NAME
    if not path.is_file():
        leftovers = sorted(p.name for p in data_dir.glob("*")) if data_dir.is_dir() else []
        hint = f" (found {len(leftovers)} other files: preparation did not finish?)" if leftovers else ""
        raise DataIndexError(
            f"{data_dir}: no {INDEX_NAME}, so this is not a prepared dataset{hint}; "
            f"run tools/prepare_data.py or ensure_prepared() first"
        )
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataIndexError(f"{path}: unreadable index ({e})") from e
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise DataIndexError(
            f"{path}: format {index.get('format')!r} version {index.get('version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    for key in ("dtype", "vocab_size", "eot_id", "tokenizer", "splits", "total_tokens"):
        if key not in index:
            raise DataIndexError(f"{path}: index is missing the {key!r} field")
    try:
        _check_index_types(index)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataIndexError(f"{path}: malformed index ({type(e).__name__}: {e}); re-prepare the directory") from None
    if verify_shards:
        itemsize = np.dtype(index["dtype"]).itemsize
        for split, entry in index["splits"].items():
            for shard in entry["shards"]:
                shard_path = data_dir / shard["file"]
                want = shard["tokens"] * itemsize
                try:
                    got = shard_path.stat().st_size
                except FileNotFoundError:
                    raise DataIndexError(f"{shard_path}: shard of split {split!r} listed in the index is missing")
                if got != want:
                    raise DataIndexError(
                        f"{shard_path}: {got} bytes on disk, but the index says {shard['tokens']} tokens "
                        f"= {want} bytes (truncated or overwritten?)"
                    )
    return index


def _check_index_types(index: dict[str, Any]) -> None:
    """Raise (KeyError/TypeError/ValueError) unless the fields readers rely on have the right shapes."""
    if np.dtype(index["dtype"]).kind != "u":
        raise ValueError(f"dtype {index['dtype']!r} is not an unsigned integer type")
    for key in ("vocab_size", "eot_id", "total_tokens"):
        if not isinstance(index[key], int) or isinstance(index[key], bool) or index[key] < 0:
            raise ValueError(f"{key} {index[key]!r} is not a non-negative integer")
    if not isinstance(index["tokenizer"], dict) or not isinstance(index["splits"], dict):
        raise TypeError("'tokenizer' and 'splits' must be objects")
    for split, entry in index["splits"].items():
        for shard in entry["shards"]:
            if not isinstance(shard["file"], str) or not _SHARD_RE.match(shard["file"]):
                raise ValueError(f"split {split!r} lists {shard['file']!r}, not a shard file name")
            if not isinstance(shard["tokens"], int) or isinstance(shard["tokens"], bool) or shard["tokens"] < 0:
                raise ValueError(f"split {split!r} shard {shard['file']} has tokens {shard['tokens']!r}")


def clean_prepared_dir(out_dir: str | os.PathLike) -> list[str]:
    """Delete the index (first, so the dir stops looking complete), our shards and temp files; keep the rest."""
    out_dir = Path(out_dir)
    removed: list[str] = []
    if not out_dir.is_dir():
        return removed
    index = out_dir / INDEX_NAME
    if index.exists():
        index.unlink()
        removed.append(index.name)
        _fsync_dir(out_dir)
    for p in sorted(out_dir.iterdir()):
        base = p.name.split(_TMP_MARK)[0]
        if p.is_file() and (_TMP_MARK in p.name and (base == INDEX_NAME or _SHARD_RE.match(base))
                            or _SHARD_RE.match(p.name)):
            p.unlink()
            removed.append(p.name)
    return removed
