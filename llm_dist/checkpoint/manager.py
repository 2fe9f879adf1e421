"""Crash-safe, elastic checkpoints: sharded model/optimizer (DCP) plus the run's small state, via fsspec.

One checkpoint, `<out_dir>/checkpoints/step_00001000/`:

    dcp/               model + optimizer, one shard file per rank + .metadata (loads on any world size)
    train_state.json   trainer counters, grad-scaler state, data-loader position (global: any world size)
    rng/rank_<r>.pt    each rank's python/numpy/torch/CUDA RNG state
    config.yaml        the resolved run config
    tokenizer.json     which tokenizer the ids belong to (+ tokenizer.bpe.json for a trained one)
    meta.json          step, world size, strategy, time, and every file with its size
    COMPLETE           written last: without it the directory is never loaded

Writing goes to `step_N.tmp/`; when every file is there, the directory is renamed to `step_N/` and only
then `COMPLETE` is written, so on any filesystem (renames on object stores are copies) a checkpoint is
complete exactly when its marker exists. A crash at any moment leaves the previous checkpoints untouched.
With `async_save`, the sharded part is copied to CPU memory by a background stager while the next step's
forward and backward run (the trainer waits for that copy only before its next optimizer step, the first
moment the saved tensors change), then written by a background thread on a separate gloo process group (so
it never waits on, or deadlocks against, the training collectives). At most one save is in flight, and
rank 0 finalises it (rename + marker) once DCP's coordinator has written the metadata, which happens only
after every rank's shards are written.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import fsspec
import torch
import torch.distributed as dist

from llm_dist import distributed as D
from llm_dist.checkpoint import sharded
from llm_dist.checkpoint.rng import get_rng_state
from llm_dist.tokenizer import Tokenizer, load_tokenizer

COMPLETE = "COMPLETE"
BUILTIN_TOKENIZERS = ("byte", "gpt2")
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/")


def _url(base: str, *parts: str) -> str:
    """Join onto a local path or URL, keeping its protocol."""
    return posixpath.join(str(base), *parts)


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def list_checkpoints(ckpt_dir: str) -> tuple[list[str], list[str]]:
    """(complete, incomplete) checkpoint URLs, each sorted by step, oldest first."""
    fs, root = _fs(ckpt_dir)
    if not fs.exists(root):
        return [], []
    complete, incomplete = [], []
    for p in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(p.rstrip("/"))
        if not name.startswith("step_"):
            continue
        url = _url(ckpt_dir, name)
        if _STEP_DIR.match(name) and fs.exists(posixpath.join(root, name, COMPLETE)):
            complete.append(url)
        else:
            incomplete.append(url)
    return complete, incomplete


def _step_of(url: str) -> int:
    m = re.match(r"step_(\d+)", posixpath.basename(str(url).rstrip("/")))
    return int(m.group(1)) if m else -1


def verify(url: str) -> str | None:
    """None if every file listed in meta.json is there with its recorded size, else what is wrong."""
    fs, root = _fs(url)
    if not fs.exists(posixpath.join(root, COMPLETE)):
        return f"checkpoint {url}: incomplete (no {COMPLETE} marker)"
    try:
        meta = json.loads(fs.cat_file(posixpath.join(root, "meta.json")))
    except Exception as e:  # noqa: BLE001 - any unreadable meta means an unusable checkpoint
        return f"checkpoint {url}/meta.json: unreadable ({type(e).__name__}: {e})"
    for rel, size in meta.get("files", {}).items():
        path = posixpath.join(root, rel)
        if not fs.exists(path):
            return f"checkpoint {url}/{rel}: missing"
        actual = fs.size(path)
        if actual != size:
            return f"checkpoint {url}/{rel}: {actual} bytes, expected {size} (truncated or overwritten)"
    return None


def find_latest(ckpt_dir: str, report: bool = True) -> str | None:
    """Newest complete checkpoint that passes `verify`; incomplete/corrupt ones are reported and skipped."""
    complete, incomplete = list_checkpoints(ckpt_dir)
    newest = _step_of(complete[-1]) if complete else -1
    if report:
        for url in incomplete:
            if _step_of(url) > newest:
                D.warn0(f"checkpoint {url} is incomplete (no {COMPLETE} marker): skipped")
    for url in reversed(complete):
        problem = verify(url)
        if problem is None:
            return url
        if report:
            D.warn0(f"{problem}: skipped, trying an older checkpoint")
    return None


def resolve_checkpoint(path: str) -> str | None:
    """`path` if it is a complete checkpoint, else the newest complete one under `path` (a checkpoints dir) or
    under `path/checkpoints` (a run dir); None if there is none."""
    if verify(path) is None:
        return path
    for cand in (str(path), _url(path, "checkpoints")):
        fs, root = _fs(cand)
        latest = find_latest(cand, report=False) if fs.isdir(root) else None
        if latest is not None:
            return latest
    return None


def read_json(url: str, name: str) -> dict:
    fs, root = _fs(url)
    return json.loads(fs.cat_file(posixpath.join(root, name)))


def read_config(url: str) -> str:
    """The resolved config.yaml text stored in a checkpoint."""
    fs, root = _fs(url)
    path = posixpath.join(root, "config.yaml")
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint {url}: no config.yaml")
    return fs.cat_file(path).decode()


def read_rng(url: str, rank: int) -> dict | None:
    """This rank's saved RNG state, or None if the checkpoint was written by fewer ranks."""
    fs, root = _fs(url)
    path = posixpath.join(root, "rng", f"rank_{rank}.pt")
    if not fs.exists(path):
        return None
    return torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)


def _tokenizer_files(tok: Tokenizer, spec: str) -> dict[str, bytes]:
    info = {"spec": spec, "name": tok.name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
            "definition": tok.definition()}
    files = {}
    if spec not in BUILTIN_TOKENIZERS:  # the checkpoint must not depend on a file elsewhere
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tok.save(Path(tmp) / "tokenizer.bpe.json")
            files["tokenizer.bpe.json"] = (Path(tmp) / "tokenizer.bpe.json").read_bytes()
        info["file"] = "tokenizer.bpe.json"
    files["tokenizer.json"] = json.dumps(info, indent=1).encode()
    return files


def load_checkpoint_tokenizer(url: str) -> Tokenizer:
    """The tokenizer a checkpoint was trained with, checked against its recorded fingerprint."""
    info = read_json(url, "tokenizer.json")
    if "file" in info:
        import tempfile

        fs, root = _fs(url)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / info["file"]
            local.write_bytes(fs.cat_file(posixpath.join(root, info["file"])))
            tok = load_tokenizer(local)
    else:
        tok = load_tokenizer(info["spec"])
    if tok.fingerprint() != info["fingerprint"]:
        raise RuntimeError(f"checkpoint {url}: tokenizer {info['spec']!r} now has fingerprint {tok.fingerprint()}, "
                           f"but the checkpoint was trained with {info['fingerprint']}")
    return tok


def load_checkpoint(url: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model + optimizer in place (any sharding, collective) and return the run's small state.

    Returns {"train_state", "rng" (this rank's, None if the writer had fewer ranks), "meta", "url"}.
    """
    state = sharded.model_optim_state(model, optimizer)
    sharded.load(state, _url(url, "dcp"))
    sharded.apply_model_optim_state(model, optimizer, state)
    return {"train_state": read_json(url, "train_state.json"), "rng": read_rng(url, D.get_rank()),
            "meta": read_json(url, "meta.json"), "url": url}


class CheckpointManager:
    """Saves (sync or async) and prunes checkpoints under `ckpt_dir`. Collective: call on every rank."""

    def __init__(self, ckpt_dir: str, keep_last_k: int = 3, async_save: bool = False) -> None:
        self.dir = str(ckpt_dir)
        self.keep_last_k = keep_last_k
        self.async_save = async_save
        self.fs, self.root = _fs(self.dir)
        # A gloo group of its own for the background writes: DCP's collectives (plan gather, metadata)
        # then never interleave with the training's NCCL/gloo collectives on the default group.
        self._group = dist.new_group(backend="gloo") if async_save and D.get_world_size() > 1 else None
        # One stager for the whole run: its CPU buffers are reused by every save instead of reallocated.
        self._stager = sharded.make_stager() if async_save else None
        self._pending: tuple[Future, Callable[[], None]] | None = None
        self._staging: Future | None = None

    def latest(self) -> str | None:
        return find_latest(self.dir)

    def save(self, step: int, model_optim: dict, train_state: dict, config_yaml: str, tokenizer: Tokenizer,
             tokenizer_spec: str, meta: dict | None = None) -> str:
        """Write checkpoint `step`. Returns its final URL (complete now, or once the async write finishes)."""
        self.wait()  # at most one save in flight
        rank = D.get_rank()
        name = step_dir_name(step)
        tmp = posixpath.join(self.root, name + ".tmp")
        if rank == 0:
            if self.fs.exists(tmp):  # left by a crash while writing this same step: incomplete by design
                self.fs.rm(tmp, recursive=True)
            self.fs.makedirs(posixpath.join(tmp, "rng"), exist_ok=True)
        D.barrier()  # the tmp dir exists before any rank writes into it
        t0 = time.perf_counter()
        _write_bytes(self.fs, posixpath.join(tmp, "rng", f"rank_{rank}.pt"), _torch_bytes(get_rng_state()))
        if rank == 0:
            files = {"train_state.json": json.dumps(train_state, indent=1).encode(), "config.yaml": config_yaml.encode(),
                     **_tokenizer_files(tokenizer, tokenizer_spec)}
            for rel, data in files.items():
                _write_bytes(self.fs, posixpath.join(tmp, rel), data)
        info = {"step": step, "world_size": D.get_world_size(), "time": time.time(), **(meta or {})}
        self._staging, fut = sharded.save(model_optim, _url(self.dir, name + ".tmp", "dcp"), process_group=self._group,
                                          asynchronous=self.async_save, stager=self._stager)
        blocked = time.perf_counter() - t0
        finalize = lambda: self._finalize(step, tmp, info, t0)  # noqa: E731
        if fut is None:
            D.barrier()  # every rank's shards and RNG file are written
            if rank == 0:
                finalize()
            D.barrier()  # nobody races ahead (e.g. to exit or to prune) before the checkpoint is final
        else:
            self._pending = (fut, finalize)
            D.print0(f"checkpoint step {step}: async save started (training blocked {blocked:.2f}s)")
        self.last_blocking_s = blocked
        return _url(self.dir, name)

    def wait_staged(self) -> None:
        """Block until the last async save has copied the state to CPU. Call before anything mutates the
        saved tensors (the next optimizer step); the copy overlaps the forward/backward until then."""
        if self._staging is not None:
            self._staging.result()
            self._staging = None

    def close(self) -> None:
        """Finish the in-flight save and release the stager's buffers and threads."""
        self.wait()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def poll(self) -> None:
        """Finalise a finished async save (rank 0 renames + marks it); cheap, call once per step."""
        if self._pending is not None and self._pending[0].done():
            self._complete_pending()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is written and finalised."""
        self.wait_staged()
        if self._pending is not None:
            self._pending[0].result()
            self._complete_pending()

    def _complete_pending(self) -> None:
        fut, finalize = self._pending
        self._pending = None
        fut.result()  # re-raises a failed background write
        if D.get_rank() == 0:
            finalize()

    def _finalize(self, step: int, tmp: str, info: dict, t0: float) -> None:
        """Rank 0: manifest -> meta.json -> rename -> COMPLETE marker -> prune."""
        sizes = {}
        for p in self.fs.find(tmp):
            rel = posixpath.relpath(p, tmp)
            sizes[rel] = self.fs.size(p)
        _write_bytes(self.fs, posixpath.join(tmp, "meta.json"), json.dumps({**info, "files": sizes}, indent=1).encode())
        final = posixpath.join(self.root, step_dir_name(step))
        if self.fs.exists(final):  # re-saving a step (e.g. after resuming from it): replace the old copy
            self.fs.rm(final, recursive=True)
        self.fs.mv(tmp, final, recursive=True)
        _write_bytes(self.fs, posixpath.join(final, COMPLETE), f"{step}\n".encode())
        self._prune(step)
        D.print0(f"checkpoint saved: {_url(self.dir, step_dir_name(step))} ({time.perf_counter() - t0:.1f}s)")

    def _prune(self, newest: int) -> None:
        """Delete complete checkpoints beyond the newest keep_last_k, and incomplete ones older than `newest`.

        Never the newest complete one (just written); an incomplete directory is only removed once a newer
        complete checkpoint covers it.
        """
        complete, incomplete = list_checkpoints(self.dir)
        doomed = [u for u in incomplete if _step_of(u) < newest]
        if self.keep_last_k > 0:
            doomed += [u for u in complete if _step_of(u) != newest][: max(0, len(complete) - self.keep_last_k)]
        for url in doomed:
            _, path = _fs(url)
            marker = posixpath.join(path, COMPLETE)
            if self.fs.exists(marker):  # marker first: an interrupted delete leaves an *incomplete* dir
                self.fs.rm(marker)
            self.fs.rm(path, recursive=True)
