"""Data preparation: text/JSONL/parquet/Arrow inputs -> tokenized train/val shards + index (see docs/data.md).

    index = ensure_prepared("data/prepared/shakespeare_byte", "data/tinyshakespeare/input.txt", "byte", 0.1)

Split rule
- exactly one plain-text input file: split by characters like nanoGPT: the first
  int(n_chars * (1 - val_fraction)) characters are train, the rest val; each part is one document.
- anything else (JSONL, parquet, Arrow, several files): split by document. A document goes to val iff
  blake2b-64(utf8(text)) / 2**64 < val_fraction. The rule depends on the text alone, so it does not
  change with file order, num_proc or sharding, and exact duplicates always land in the same split.

Every document's tokens are followed by `eot_id`; empty documents are skipped. Documents keep input
order (files in the order given, globs sorted, JSONL in line order, parquet/Arrow in row order) within
each split. Progress lines give a percentage and ETA (bytes read of the inputs' known total size).

Re-running is idempotent: if `out_dir` holds a complete index built from the same tokenizer fingerprint,
the same files (path, size, mtime) and the same settings, nothing is done. A mismatch raises unless
`overwrite=True`. A directory without an index (an interrupted run) is cleaned and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from llm_dist.cli_args import max_processes, output_dir_problem
from llm_dist.data.index import (
    INDEX_NAME,
    DataIndexError,
    ShardWriter,
    clean_prepared_dir,
    dtype_for_vocab,
    make_index,
    read_index,
    write_index,
)
from llm_dist.data.mixture import MIXTURE_NAME, MixtureSource, source_dir_name, write_mixture
from llm_dist.data.sources import (
    DataPrepError,
    SourceFile,
    check_source_columns,
    read_text_chunks,
    resolve_sources,
    source_documents,
    split_at_safe_boundary,
)
from llm_dist.tokenizer import Tokenizer, load_tokenizer
from llm_dist.tokenizer.progress import format_eta

SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
Log = Callable[[str], None]


def val_by_hash(text: str, val_fraction: float) -> bool:
    """The document split rule: True if this document belongs to the val split."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


def char_split_point(n_chars: int, val_fraction: float) -> int:
    """Number of leading characters that go to train in the single-text-file rule (nanoGPT's int(n*0.9))."""
    return int(n_chars * (1.0 - val_fraction))


# ---------------------------------------------------------------------------------------------------------
# Tokenization workers. A work item is (split, texts, ends): `ends[i]` says whether texts[i] finishes a
# document (and so gets an EOT after it); a long single-file document arrives as several pieces.

_WORKER_TOK: Tokenizer | None = None


def _init_worker(tok: Tokenizer | str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = load_tokenizer(tok) if isinstance(tok, str) else tok


def _encode_item(item: tuple[str, list[str], list[bool]], dtype: np.dtype, vocab_size: int
                 ) -> tuple[str, np.ndarray, int, int]:
    split, texts, ends = item
    tok = _WORKER_TOK
    assert tok is not None, "worker tokenizer not initialised"
    eot = tok.eot_id
    flat: list[int] = []
    for ids, end in zip(tok.encode_batch(texts), ends):
        flat.extend(ids)
        if end:
            flat.append(eot)
    arr = np.array(flat, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise DataPrepError(f"tokenizer {tok.name!r} produced id {int(arr.max())} outside its vocab of {vocab_size}")
    return split, arr.astype(dtype), sum(ends), sum(len(t) for t in texts)


class _Encoder:
    """Ordered, bounded-memory fan-out of work items to `num_proc` processes (inline when num_proc <= 1).

    Pool.imap would drain the whole input into its task queue; keeping at most 2*num_proc items in flight
    bounds memory for inputs of any size, and popping results in submission order keeps documents in order.
    """

    def __init__(self, tokenizer: Tokenizer, spec: str | None, num_proc: int, dtype: np.dtype) -> None:
        self.args = (dtype, tokenizer.vocab_size)
        self.pool = None
        self.pending: deque = deque()
        if num_proc <= 1:
            _init_worker(tokenizer)
            return
        if "fork" in mp.get_all_start_methods():
            # Forked workers inherit the tokenizer object: nothing is pickled, nothing is re-loaded.
            ctx, init_arg = mp.get_context("fork"), tokenizer
        else:
            ctx, init_arg = mp.get_context("spawn"), (spec if spec is not None else tokenizer)
        self.pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(init_arg,))
        self.max_pending = 2 * num_proc

    def submit(self, item: tuple[str, list[str], list[bool]]) -> Iterator[tuple[str, np.ndarray, int, int]]:
        if self.pool is None:
            yield _encode_item(item, *self.args)
            return
        self.pending.append(self.pool.apply_async(_encode_item, (item, *self.args)))
        while len(self.pending) > self.max_pending:
            yield self.pending.popleft().get()

    def drain(self) -> Iterator[tuple[str, np.ndarray, int, int]]:
        while self.pending:
            yield self.pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class _Progress:
    """Prints "docs, tokens, tokens/s" at most every `interval` seconds, and once at the end; with the inputs'
    total size known, also the share read and an ETA (`fraction` is set by the reading side)."""

    def __init__(self, log: Log | None, interval: float) -> None:
        self.log, self.interval = log, interval
        self.t0 = self.last = time.perf_counter()
        self.docs = {s: 0 for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}
        self.chars = 0
        self.fraction: float | None = None  # of the input read so far; None: total size unknown

    def add(self, split: str, tokens: int, docs: int, chars: int) -> None:
        self.tokens[split] += tokens
        self.docs[split] += docs
        self.chars += chars
        now = time.perf_counter()
        if self.log is not None and now - self.last >= self.interval:
            self.last = now
            self.log(self.line("progress"))

    def line(self, what: str) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tok = sum(self.tokens.values())
        share = ""
        if self.fraction is not None and what == "progress":
            share = f"{100 * self.fraction:5.1f}% eta {format_eta(self.fraction, dt)}, "
        return (f"prepare_data {what}: {share}{sum(self.docs.values()):,} docs, {tok:,} tokens "
                f"(train {self.tokens['train']:,} / val {self.tokens['val']:,}), {self.chars:,} chars, "
                f"{tok / dt / 1e6:.2f}M tokens/s, {dt:.1f}s")


# ---------------------------------------------------------------------------------------------------------
# Work-item producers: both yield (split, text, ends_document, fraction_of_input_read) in output order.

def _single_file_pieces(src: SourceFile, val_fraction: float, chunk_chars: int
                        ) -> tuple[Iterator[tuple[str, str, bool, float]], dict[str, Any]]:
    # Pass 1 counts characters, so the split point is known before streaming pass 2 (no whole-file copy).
    n_chars = sum(len(p) for p in read_text_chunks(src.url, 1 << 22, src.codec))
    if n_chars == 0:
        raise DataPrepError(f"{src.url}: empty input (0 characters)")
    n_train = char_split_point(n_chars, val_fraction)
    rule = {"kind": "chars", "val_fraction": val_fraction, "chars": n_chars,
            "train_chars": n_train, "val_chars": n_chars - n_train}

    def pieces() -> Iterator[tuple[str, str, bool, float]]:
        pos = 0
        carry = {"train": "", "val": ""}
        for raw in read_text_chunks(src.url, chunk_chars, src.codec):
            cut = min(max(n_train - pos, 0), len(raw))
            pos += len(raw)
            for split, part in (("train", raw[:cut]), ("val", raw[cut:])):
                if not part:
                    continue
                buf = carry[split] + part
                i = split_at_safe_boundary(buf)
                if i > 0:
                    yield split, buf[:i], False, pos / n_chars
                    buf = buf[i:]
                carry[split] = buf
        for split in SPLITS:  # the remainder of each split closes its (single) document
            if carry[split]:
                yield split, carry[split], True, 1.0

    return pieces(), rule


def _document_pieces(sources: list[SourceFile], val_fraction: float, text_field: str
                     ) -> tuple[Iterator[tuple[str, str, bool, float]], dict[str, Any]]:
    rule = {"kind": "documents", "val_fraction": val_fraction,
            "rule": "val iff blake2b(utf8(text), digest_size=8) as big-endian int / 2**64 < val_fraction"}
    # Progress by bytes: files weigh their size (each counts 1 when a size is unknown).
    weights = [float(s.size) if s.size else 1.0 for s in sources]
    total = sum(weights) or 1.0

    def pieces() -> Iterator[tuple[str, str, bool, float]]:
        before = 0.0
        for src, w in zip(sources, weights):
            for text, frac in source_documents(src, text_field):
                if text:
                    yield ("val" if val_by_hash(text, val_fraction) else "train"), text, True, (before + frac * w) / total
            before += w

    return pieces(), rule


# ---------------------------------------------------------------------------------------------------------

def _recipe(sources: list[SourceFile], tokenizer: Tokenizer, val_fraction: float, text_field: str) -> dict:
    """What the prepared data is a function of; equal recipes mean "already prepared"."""
    recipe = {
        "sources": [s.to_json() for s in sources],
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "val_fraction": float(val_fraction),
        "text_field": text_field if any(s.kind != "text" for s in sources) else None,
    }
    return json.loads(json.dumps(recipe))  # normalise (tuples -> lists, floats) to compare with loaded JSON


def _recipe_diff(old: dict, new: dict) -> str:
    diffs = []
    if old.get("tokenizer_fingerprint") != new["tokenizer_fingerprint"]:
        diffs.append(f"tokenizer fingerprint {old.get('tokenizer_fingerprint')} -> {new['tokenizer_fingerprint']}")
    for key in ("val_fraction", "text_field"):
        if old.get(key) != new[key]:
            diffs.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    old_src = {s["url"]: s for s in old.get("sources", [])}
    new_src = {s["url"]: s for s in new["sources"]}
    if list(old_src) != list(new_src):
        diffs.append(f"input files {sorted(old_src)[:3]}... -> {sorted(new_src)[:3]}...")
    else:
        for url, s in new_src.items():
            if old_src[url] != s:
                diffs.append(f"{url} changed (size {old_src[url].get('size')} -> {s['size']}, "
                             f"mtime {old_src[url].get('mtime')} -> {s['mtime']})")
                break
    return "; ".join(diffs) or "index recipe differs"


def check_output_dir(out_dir: Path) -> None:
    """DataPrepError unless `out_dir` is a directory or can be created as one (nothing is touched)."""
    problem = output_dir_problem(out_dir)
    if problem:
        raise DataPrepError(problem)


def _discard(out_dir: Path, created: Path | None) -> None:
    """After a failed preparation: remove our shards and temp files, and the directories we made (`created`
    is the outermost one mkdir created, None if `out_dir` existed)."""
    clean_prepared_dir(out_dir)
    if created is None:
        return
    d = out_dir.absolute()
    while True:
        try:
            d.rmdir()  # only if empty: never someone else's files
        except OSError:
            return
        if d == created or d.parent == d:
            return
        d = d.parent


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of `path` that does not exist yet (what mkdir(parents=True) will create)."""
    missing = None
    for d in [path, *path.parents]:
        if d.exists():
            break
        missing = d
    return missing


def prepare_dataset(
    out_dir: str | os.PathLike,
    sources: str | Sequence[str],
    tokenizer: Tokenizer | str,
    val_fraction: float = 0.1,
    *,
    text_field: str = "text",
    input_format: str = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_proc: int = 1,
    overwrite: bool = False,
    log: Log | None = print,
    progress_interval: float = 5.0,
    chunk_chars: int = 1 << 20,
    min_split_tokens: int = 0,
    min_tokens_hint: str = "",
) -> dict[str, Any]:
    """Tokenize `sources` into shards under `out_dir` and return the index (a no-op if already prepared).

    sources: paths, globs or fsspec URLs of text / JSONL files. tokenizer: a Tokenizer or a
    `load_tokenizer` spec ("byte", "gpt2", a tokenizer file path). Raises DataPrepError on bad input and
    when `out_dir` holds data prepared from something else (unless `overwrite`). `min_split_tokens`: every
    split must come out with at least this many tokens (a loader of context T needs T + 1), else nothing is
    kept and the error says how many there are (`min_tokens_hint` is appended: how to fix it).
    A failed preparation removes the shards it wrote, and `out_dir` itself if this call created it.
    """
    if not 0.0 <= val_fraction < 1.0:  # also false for nan
        raise DataPrepError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise DataPrepError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 1 <= num_proc <= max_processes():
        raise DataPrepError(f"num_proc (--num-proc / data.num_proc) must be in [1, {max_processes()}] (4 x the "
                            f"{os.cpu_count()} CPUs here), got {num_proc}")
    out_dir = Path(out_dir)
    check_output_dir(out_dir)  # before the (maybe slow) tokenizer load and before anything is written
    if (out_dir / MIXTURE_NAME).exists():
        raise DataPrepError(f"{out_dir} holds a prepared mixture ({MIXTURE_NAME}); prepare a single corpus into "
                            "another directory, or remove it")
    spec = tokenizer if isinstance(tokenizer, str) else None
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    srcs = resolve_sources(sources, input_format)
    check_source_columns(srcs, text_field)  # a missing --text-field column fails before anything is written
    recipe = _recipe(srcs, tok, val_fraction, text_field)

    if (out_dir / INDEX_NAME).exists():
        try:
            existing = read_index(out_dir)
        except DataIndexError as e:
            existing = None
            if log:
                log(f"prepare_data: rebuilding {out_dir}: {e}")
        if existing is not None:
            if existing.get("recipe") == recipe:
                if log:
                    log(f"prepare_data: {out_dir} already prepared ({existing['total_tokens']:,} tokens); nothing to do")
                return existing
            if not overwrite:
                raise DataPrepError(
                    f"{out_dir} holds data prepared from different inputs ({_recipe_diff(existing.get('recipe', {}), recipe)}); "
                    f"pass overwrite=True (--overwrite) to rebuild it, or choose another output directory"
                )
    single_text = len(srcs) == 1 and srcs[0].kind == "text"
    if single_text:  # reads the whole file once (counting characters): a bad file fails before anything is written
        pieces, rule = _single_file_pieces(srcs[0], val_fraction, chunk_chars)
    else:
        pieces, rule = _document_pieces(srcs, val_fraction, text_field)

    created = _first_missing(out_dir.absolute())
    out_dir.mkdir(parents=True, exist_ok=True)
    removed = clean_prepared_dir(out_dir)  # index first, then stale shards/temps of an earlier run
    if removed and log:
        log(f"prepare_data: removed {len(removed)} files of an earlier or unfinished preparation in {out_dir}")

    dtype = dtype_for_vocab(tok.vocab_size)
    splits = SPLITS if val_fraction > 0 else ("train",)
    writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens) for s in splits}
    progress = _Progress(log, progress_interval)
    known_size = all(s.size is not None for s in srcs)
    encoder = _Encoder(tok, spec, num_proc, dtype)
    # Batch pieces per split into ~chunk_chars work items; a split's items reach its writer in order.
    batch: dict[str, tuple[list[str], list[bool]]] = {s: ([], []) for s in SPLITS}
    batch_chars = {s: 0 for s in SPLITS}

    def consume(results: Iterator[tuple[str, np.ndarray, int, int]]) -> None:
        for split, arr, docs, chars in results:
            writers[split].write(arr)
            progress.add(split, int(arr.size), docs, chars)

    try:
        for split, text, end, fraction in pieces:
            progress.fraction = fraction if known_size else None
            texts, ends = batch[split]
            texts.append(text)
            ends.append(end)
            batch_chars[split] += len(text)
            if batch_chars[split] >= chunk_chars:
                consume(encoder.submit((split, texts, ends)))
                batch[split], batch_chars[split] = ([], []), 0
        for split in SPLITS:
            if batch[split][0]:
                consume(encoder.submit((split, *batch[split])))
        consume(encoder.drain())
        shard_lists = {s: w.close() for s, w in writers.items()}
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, Exception):  # bad input found mid-way; an interrupt leaves its shards for the re-run
            _discard(out_dir, created)
        raise
    finally:
        encoder.close()

    names = ", ".join(s.url for s in srcs[:3]) + (" ..." if len(srcs) > 3 else "")
    if progress.tokens["train"] == 0:
        _discard(out_dir, created)
        raise DataPrepError(f"empty input: no text (or no train documents) in {names}")
    short = {s: writers[s].total_tokens for s in splits if writers[s].total_tokens < min_split_tokens}
    if short:
        _discard(out_dir, created)
        got = ", ".join(f"{s} {n:,}" for s, n in short.items())
        raise DataPrepError(
            f"{names}: too little text: {got} tokens with tokenizer {tok.name!r}, but the loader needs at least "
            f"{min_split_tokens:,} tokens (context length + 1) in each split{'; ' + min_tokens_hint if min_tokens_hint else ''}")
    if log and val_fraction > 0 and progress.tokens["val"] == 0:
        log(f"prepare_data: warning: val split is empty ({progress.docs['train']} documents, all hashed to train)")

    index = make_index(
        dtype, tok.vocab_size, tok.eot_id,
        {"name": tok.name, "fingerprint": tok.fingerprint(), "spec": spec, "definition": tok.definition()},
        shard_tokens,
        {s: {"tokens": writers[s].total_tokens, "documents": progress.docs[s], "shards": shard_lists[s]}
         for s in splits},
        split_rule=rule,
        recipe=recipe,
    )
    write_index(out_dir, index)  # last: only now does the directory count as prepared
    if log:
        log(progress.line("done"))
    return index


def use_or_prepare(
    out_dir: str | os.PathLike,
    sources: str | Sequence[str],
    tokenizer: Tokenizer | str,
    val_fraction: float = 0.1,
    *,
    dir_key: str = "data.dir",
    source_key: str = "data.source",
    log: Log | None = print,
    **kwargs: Any,
) -> dict[str, Any]:
    """The trainer's rule: a valid prepared directory is authoritative; the source is needed only to build one.

    - `out_dir` holds a valid index (every shard present with its recorded size): it is used as is, whatever
      the source's state (missing, touched, moved). If the source is there but its content differs (sizes,
      not mtimes) or `val_fraction` differs from the index's, one note says the prepared data is used.
    - otherwise (no index, or a damaged one) it is (re)built from `sources` with `prepare_dataset`; when the
      source cannot be read either, the one-line DataPrepError names both problems.
    Whether the tokenizer matches is the loader's check (`index["tokenizer"]["fingerprint"]`).
    """
    out_dir = Path(out_dir)
    try:
        index = read_index(out_dir)
    except DataIndexError as e:
        index, damage = None, e
    if index is not None:
        note = _recipe_note(index, sources, val_fraction, kwargs.get("input_format", "auto"), source_key)
        if note and log:
            log(f"note: {dir_key} {out_dir} is already prepared and is used as is; {note}")
        return index
    try:
        resolve_sources(sources, kwargs.get("input_format", "auto"))
    except DataPrepError as e:
        if (out_dir / INDEX_NAME).exists():
            raise DataPrepError(f"{dir_key} {out_dir} is damaged ({damage}), and {source_key} {e}, so it cannot be "
                                "rebuilt") from None
        raise DataPrepError(f"{source_key} {e}; {dir_key} {out_dir} holds no prepared data (no {INDEX_NAME}) to "
                            "train on instead") from None
    # No index, or a damaged one: (re)build it (prepare_dataset logs why it rebuilds).
    return prepare_dataset(out_dir, sources, tokenizer, val_fraction, log=log, **kwargs)


def _recipe_note(index: dict, sources: str | Sequence[str], val_fraction: float, input_format: str,
                 source_key: str) -> str:
    """What differs between the prepared data's recipe and today's source/settings ('' = nothing known)."""
    recipe = index.get("recipe") or {}
    notes = []
    if recipe.get("val_fraction") is not None and float(recipe["val_fraction"]) != float(val_fraction):
        notes.append(f"it was split with val_fraction {recipe['val_fraction']}, not {val_fraction}")
    try:
        srcs = resolve_sources(sources, input_format, detect=False)  # sizes only: no file is opened
    except DataPrepError:
        srcs = None  # the source is gone: nothing to compare, and nothing needed
    if srcs is not None and "sources" in recipe:
        old = [(s.get("url"), s.get("size")) for s in recipe["sources"]]
        new = [(s.url, s.size) for s in srcs]
        if [u for u, _ in old] != [u for u, _ in new]:
            notes.append(f"{source_key} now names other files than it was prepared from")
        elif old != new:
            url, size = next((u, n) for (u, n), (_, o) in zip(new, old) if n != o)
            was = dict(old)[url]
            notes.append(f"{source_key} {url} changed since (size {was} -> {size} bytes)")
    if not notes:
        return ""
    return "; ".join(notes) + " (to rebuild: tools/prepare_data.py --overwrite, or another data.dir)"


def ensure_prepared(
    out_dir: str | os.PathLike,
    sources: str | Sequence[str],
    tokenizer: Tokenizer | str,
    val_fraction: float = 0.1,
    **kwargs: Any,
) -> dict[str, Any]:
    """Make sure `out_dir` holds `sources` prepared with `tokenizer`; return its index.

    Call it on rank 0 only, then barrier, then build loaders on every rank. Cheap when the data is already
    there (stats the inputs and reads the index). The trainer uses `use_or_prepare` instead, for which a
    valid prepared directory is enough (no source needed). Keyword arguments are
    those of `prepare_dataset` (shard_tokens, num_proc, text_field, overwrite, log, ...).
    """
    return prepare_dataset(out_dir, sources, tokenizer, val_fraction, **kwargs)


def prepare_mixture(
    out_dir: str | os.PathLike,
    sources: Sequence[MixtureSource],
    tokenizer: Tokenizer | str,
    val_fraction: float = 0.1,
    *,
    text_field: str = "text",
    use_existing: bool = False,
    log: Log | None = print,
    **kwargs: Any,
) -> dict[str, Any]:
    """Prepare each mixture source into `<out_dir>/<NN>-<name>/` and write `<out_dir>/mixture.json`.

    use_existing: the trainer's rule (`use_or_prepare`: a valid prepared sub-directory is used as is); else
    each source goes through `prepare_dataset` (a no-op when already prepared from the same input).
    Weights live only in mixture.json, so changing them re-uses every source's shards. Returns mixture.json.
    `kwargs` are `prepare_dataset`'s (num_proc, shard_tokens, min_split_tokens, ...).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    if (out_dir / INDEX_NAME).exists():
        raise DataPrepError(f"{out_dir} holds a single prepared corpus ({INDEX_NAME}), not a mixture; choose another "
                            "output directory for the mixture")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    names = []
    for i, src in enumerate(sources):
        name = source_dir_name(i, src.path)
        field = src.text_field or text_field
        if log:
            log(f"prepare_data: mixture source {i} ({src.path}, weight {src.weight:g}) -> {out_dir / name}")
        if use_existing:
            use_or_prepare(out_dir / name, src.path, tok, val_fraction, text_field=field, log=log,
                           dir_key=f"mixture source {i}'s directory", source_key=f"mixture source {i}", **kwargs)
        else:
            prepare_dataset(out_dir / name, src.path, tok, val_fraction, text_field=field, log=log, **kwargs)
        names.append(name)
    return write_mixture(out_dir, names, list(sources))
