"""Checkpoint file checksums: computed where each file is written, checked before its contents are trusted.

A checkpoint's `meta.json` records, besides every file's size, a CRC-32 of every 64 MiB block of every file
(`"checksums": {"algorithm": "crc32", "block_bytes": ..., "files": {rel: [hex, ...]}}`). Sizes alone miss an
overwrite in place (4 KiB of 0xFF written into a shard at the same size passed them and NaNs were trained
on); the checksums catch any such change.

Why CRC-32 over blocks: `zlib.crc32` runs at ~3 GB/s on one core (hardware-assisted) and releases the GIL,
so the blocks of one large shard are hashed by a thread pool in parallel; per-block values also name where
a file is damaged. It is an integrity check against accidents (bit rot, partial overwrites, a copy gone
wrong), not a signature against an attacker who can rewrite `meta.json` too: that is what the data-only
loading (no unpickling) is for.

Where the work happens, so it costs little:
- save: each rank hashes the shard files it writes inside DCP's `write_data` (`DigestingWriterMixin`), on
  a local filesystem *while* DCP writes them (`FollowingChecksums` follows the growing files from the page
  cache), so it adds little to the write, runs in the background thread for async saves and on every rank
  in parallel; the per-rank results travel as `sums/rank_<r>.json` and rank 0 folds them into `meta.json`
  when it finalises the checkpoint.
- load: `verify_checksums` runs in a background thread while DCP reads the same files (`run_verified`), and
  the caller decides after both finish; on several ranks each rank checks its share of the files.
"""

from __future__ import annotations

import json
import mmap
import os
import posixpath
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Seconds callers spent waiting for checksums beyond their own work (the part not overlapped with DCP's
# writing or reading), summed over the process's saves and loads. A diagnostic for tools/bench_checkpoint.py:
# it prices the checksums directly, where whole save times swing by 2x with the disk's writeback.
EXPOSED_S = {"save": 0.0, "load": 0.0}

ALGORITHM = "crc32"
BLOCK_BYTES = 64 * 1024 * 1024
SUMS_DIR = "sums"
T = TypeVar("T")


class ChecksumMismatch(RuntimeError):
    """A checkpoint file's bytes differ from what was recorded when it was written (one line)."""


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _crc_block(fs: fsspec.AbstractFileSystem, path: str, offset: int, length: int) -> str:
    if isinstance(fs, LocalFileSystem):
        # zlib reads the page cache through a memory map: no copy into Python bytes (~1.4x the throughput of
        # reading, and less memory traffic competing with the load that runs beside it)
        if length <= 0:
            return f"{0:08x}"
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                crc, end = 0, min(offset + length, len(mm))
                for pos in range(offset, end, 8 << 20):
                    crc = zlib.crc32(view[pos:min(pos + (8 << 20), end)], crc)
            finally:
                view.release()  # before the map closes
        return f"{crc & 0xFFFFFFFF:08x}"
    with fs.open(path, "rb") as f:
        f.seek(offset)
        crc, left = 0, length
        while left > 0:  # 8 MiB reads: bounded memory per thread whatever the block size
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return f"{crc & 0xFFFFFFFF:08x}"


def crc_bytes(data: bytes, block_bytes: int = BLOCK_BYTES) -> list[str]:
    """Block CRCs of an in-memory file (small files written from memory: no need to read them back)."""
    if not data:
        return [f"{0:08x}"]
    return [f"{zlib.crc32(data[i:i + block_bytes]) & 0xFFFFFFFF:08x}" for i in range(0, len(data), block_bytes)]


def file_checksums(fs: fsspec.AbstractFileSystem, paths: dict[str, str], block_bytes: int = BLOCK_BYTES,
                   workers: int | None = None) -> dict[str, list[str]]:
    """{key: [crc of each block]} for {key: path}; every block of every file hashed by one thread pool."""
    jobs: list[tuple[str, int, int, str]] = []
    for key, path in paths.items():
        size = fs.size(path)
        jobs += [(key, off, min(block_bytes, size - off), path) for off in range(0, max(size, 1), block_bytes)]
    out: dict[str, list[str]] = {key: [] for key in paths}
    with ThreadPoolExecutor(max_workers=workers or _workers()) as pool:
        crcs = list(pool.map(lambda j: _crc_block(fs, j[3], j[1], j[2]), jobs))
    for (key, _, _, _), crc in zip(jobs, crcs):
        out[key].append(crc)
    return out


def checksum_record(files: dict[str, list[str]], block_bytes: int = BLOCK_BYTES) -> dict[str, Any]:
    """The `checksums` entry of meta.json."""
    return {"algorithm": ALGORITHM, "block_bytes": block_bytes, "files": dict(sorted(files.items()))}


def verify_checksums(url: str, meta: dict, rels: Iterable[str] | None = None, workers: int | None = None
                     ) -> str | None:
    """None when every file (or the `rels` subset) hashes to its recorded blocks, else a line naming the first
    file that does not (and its first bad block). A checkpoint written before checksums existed has none to
    check: None (its sizes were checked by `verify`)."""
    record = meta.get("checksums")
    if not record:
        return None
    if record.get("algorithm") != ALGORITHM or not isinstance(record.get("files"), dict):
        return f"checkpoint {url}/meta.json: unknown checksum record {record.get('algorithm')!r}"
    block = int(record.get("block_bytes", BLOCK_BYTES))
    fs, root = fsspec.core.url_to_fs(str(url))
    root = root.rstrip("/")
    want = record["files"]
    names = sorted(want) if rels is None else sorted(r for r in rels if r in want)
    paths = {rel: posixpath.join(root, rel) for rel in names}
    for rel, path in paths.items():
        if not fs.exists(path):
            return f"checkpoint {url}/{rel}: missing"
    got = file_checksums(fs, paths, block, workers)
    for rel in names:
        if got[rel] != want[rel]:
            bad = next((i for i, (a, b) in enumerate(zip(got[rel], want[rel])) if a != b), min(len(got[rel]),
                                                                                                len(want[rel])))
            end = min((bad + 1) * block, fs.size(paths[rel])) - 1
            return (f"checkpoint {url}/{rel}: checksum mismatch in bytes {bad * block}-{end} "
                    "(the file changed after it was written)")
    return None


def run_verified(url: str, meta: dict, action: Callable[[], T], rels: Iterable[str] | None = None,
                 keep: tuple[type[BaseException], ...] = ()) -> T:
    """Run `action()` (the load) while a background thread checks the checksums of `rels` (default all
    files); raise ChecksumMismatch after the load if they do not match. The two overlap: DCP's reading and
    deserialising keeps one core busy, the hashing another, and the files are read once from disk (the
    second reader finds them in the page cache). A load that fails on a file whose checksum also fails is
    reported as the checksum mismatch (the cause), except for the error types in `keep`, which are raised as
    they are (with the mismatch appended when there is one)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Half the cores (one on a 2-core machine): the load itself keeps the others busy.
        check: Future = pool.submit(verify_checksums, url, meta, rels, max(1, (os.cpu_count() or 2) // 2))
        try:
            result = action()
        except keep as e:
            # Errors that matter more than damage (refused, possibly crafted metadata) keep their type and
            # stop the run; the checksum verdict is added, so bit rot is told from a resealed forgery.
            problem = check.result()
            if problem is not None:
                raise type(e)(f"{e}; {problem}") from None
            raise
        except Exception:
            problem = check.result()
            if problem is not None:  # the load failed *because* a file changed: say that, not the parser's words
                raise ChecksumMismatch(problem) from None
            raise
        t0 = time.perf_counter()
        problem = check.result()
        EXPOSED_S["load"] += time.perf_counter() - t0
    if problem is not None:
        raise ChecksumMismatch(problem)
    return result


class FollowingChecksums:
    """Block CRCs of the files a writer is producing in a local directory, computed *while* it writes.

    A thread follows every file whose name starts with `prefix`, hashing bytes as soon as the file has grown
    past them (from the page cache: the writer has just put them there), so hashing overlaps the writer's
    serialisation and I/O instead of adding a second pass after it. This relies on the writer appending
    only: DCP's FileSystemWriter writes each file front to back (torch.save's zip writer puts each
    record's CRC in its local header before the data, and the central directory last), never seeking back.
    `finish()` hashes whatever is left once the writer has closed its files; the recorded values are then
    exactly those of the finished files (the tests recompute them from disk).
    """

    _STEP = 8 << 20  # bytes read per pread: bounded memory, fine-grained progress

    def __init__(self, directory: str, prefix: str, block_bytes: int = BLOCK_BYTES, poll_s: float = 0.02) -> None:
        self.dir, self.prefix, self.block, self.poll_s = directory, prefix, block_bytes, poll_s
        self._files: dict[str, tuple[int, int, list[str], int]] = {}  # name -> (fd, offset, crcs, running crc)
        self._done = threading.Event()
        self._stale: set[str] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llm_dist-checksums", daemon=True)

    def start(self) -> "FollowingChecksums":
        # Files already there (left by a crashed save on node-local storage, where rank 0 cannot clean them)
        # are hashed only once the writer is done: rewritten in place, a stale prefix could not be told apart.
        self._stale = set(self._names())
        self._thread.start()
        return self

    def _advance(self, name: str, final: bool) -> bool:
        """Hash what `name` has gained since last time; True if anything was hashed."""
        path = os.path.join(self.dir, name)
        if name not in self._files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return False
            self._files[name] = (fd, 0, [], 0)
        fd, offset, crcs, crc = self._files[name]
        st = os.fstat(fd)
        try:
            replaced = os.stat(path).st_ino != st.st_ino  # a new file under the name: follow that one
        except FileNotFoundError:
            replaced = False
        if replaced:
            os.close(fd)
            del self._files[name]
            return self._advance(name, final)
        size = st.st_size
        if size < offset:  # truncated and rewritten (a stale file from a crashed save reopened with "wb")
            offset, crcs, crc = 0, [], 0
        progressed = False
        while offset < size:
            end_of_block = (offset // self.block + 1) * self.block
            data = os.pread(fd, min(self._STEP, size - offset, end_of_block - offset), offset)
            if not data:
                break
            crc = zlib.crc32(data, crc)
            offset += len(data)
            progressed = True
            if offset == end_of_block:
                crcs.append(f"{crc & 0xFFFFFFFF:08x}")
                crc = 0
        if final and (offset % self.block or offset == 0):  # the last, partial block (or an empty file)
            crcs.append(f"{crc & 0xFFFFFFFF:08x}")
        self._files[name] = (fd, offset, crcs, crc)
        return progressed

    def _names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if n.startswith(self.prefix))
        except FileNotFoundError:
            return []

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                if not any([self._advance(n, final=False) for n in self._names() if n not in self._stale]):
                    self._done.wait(self.poll_s)
        except BaseException as e:  # noqa: BLE001 - reported by finish(), on the writer's thread
            self._error = e

    def finish(self, names: Iterable[str]) -> dict[str, list[str]]:
        """Stop following (the writer has closed `names`), hash the rest, return {name: block crcs}."""
        self._done.set()
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            for name in names:
                self._advance(name, final=True)
            return {name: self._files[name][2] for name in names}
        finally:
            for fd, *_ in self._files.values():
                os.close(fd)
            self._files.clear()


class DigestingWriterMixin:
    """Mixed into a DCP FileSystemWriter: after `write_data` has written this rank's shard files, hash them
    (they are still in the page cache) and write `<checkpoint>/sums/rank_<r>.json`, together with the
    checksums of any file this rank wrote itself (`extra_sums`, e.g. its RNG file).

    The sums file is written *inside* write_data, before this rank's write results reach DCP's
    coordinator, so by the time the coordinator has written the metadata (and rank 0 finalises), every
    rank's sums file exists: no extra collective, and the same order for sync and async saves.
    """

    sums_root: str = ""  # the checkpoint directory (parent of dcp/), set by the creator
    sums_prefix: str = "dcp"  # where the shard files sit relative to sums_root
    extra_sums: dict[str, list[str]] = {}
    sums_rank: int = 0

    def write_data(self, plan: Any, planner: Any) -> Any:  # noqa: ANN401 - DCP's Future[list[WriteResult]]
        fs, root = fsspec.core.url_to_fs(str(self.sums_root))
        root = root.rstrip("/")
        shard_dir = posixpath.join(root, self.sums_prefix)
        prefix = getattr(plan.storage_data, "prefix", None)  # this rank's file names: "__<rank>_<i>.distcp"
        follower = None
        if isinstance(fs, LocalFileSystem) and isinstance(prefix, str) and prefix:
            follower = FollowingChecksums(shard_dir, prefix).start()  # hash while DCP writes
        try:
            fut = super().write_data(plan, planner)  # type: ignore[misc]
            results = fut.wait()  # FileSystemWriter writes synchronously and returns a completed future
        except BaseException:
            if follower is not None:
                try:
                    follower.finish([])
                except Exception:  # noqa: BLE001 - DCP's own error is the one to report
                    pass
            raise
        names = sorted({r.storage_data.relative_path for r in results})
        t0 = time.perf_counter()
        if follower is not None:
            followed = follower.finish(names)
        else:  # a remote filesystem: read the files back once
            followed = file_checksums(fs, {n: posixpath.join(shard_dir, n) for n in names})
        EXPOSED_S["save"] += time.perf_counter() - t0
        sums = {**{posixpath.join(self.sums_prefix, n): c for n, c in followed.items()}, **self.extra_sums}
        fs.makedirs(posixpath.join(root, SUMS_DIR), exist_ok=True)
        with fs.open(posixpath.join(root, SUMS_DIR, f"rank_{self.sums_rank}.json"), "wb") as f:
            f.write(json.dumps(sums).encode())
        return fut


def collect_rank_sums(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, list[str]]:
    """Merge every `sums/rank_<r>.json` under a checkpoint being finalised."""
    out: dict[str, list[str]] = {}
    sums_dir = posixpath.join(root, SUMS_DIR)
    if fs.exists(sums_dir):
        for p in sorted(fs.ls(sums_dir, detail=False)):
            data = json.loads(fs.cat_file(p))
            if isinstance(data, dict):
                out.update({str(k): [str(c) for c in v] for k, v in data.items() if isinstance(v, list)})
    return out
