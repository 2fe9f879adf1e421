"""Crash-safe, elastic checkpoints: sharded model/optimizer (DCP) plus the run's small state, via fsspec.

One checkpoint, `<out_dir>/checkpoints/step_00001000/`:

    dcp/               model + optimizer, one shard file per rank + .metadata.json (loads on any world size)
    train_state.json   trainer counters, grad-scaler state, data-loader position (global: any world size)
    rng/rank_<r>.pt    each rank's python/numpy/torch/CUDA RNG state
    config.yaml        the resolved run config
    llm_dist_tokenizer.json  which tokenizer the ids belong to (+ llm_dist_tokenizer.bpe.json for a stored BPE,
                       or hf_tokenizer.json for one imported from a Hugging Face folder; checkpoints from
                       before the rename: tokenizer.json / tokenizer.bpe.json, still read)
    meta.json          step, world size, strategy, time, every file with its size and block CRC-32s
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

import errno
import io
import json
import posixpath
import re
import time
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any, Callable

import fsspec
import torch
import torch.distributed as dist
import yaml

from llm_dist import distributed as D
from llm_dist.checkpoint import integrity, sharded
from llm_dist.checkpoint.rng import get_rng_state
from llm_dist.checkpoint.sharded import CheckpointReadError, one_line
from llm_dist.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

COMPLETE = "COMPLETE"
BUILTIN_TOKENIZERS = ("byte", "gpt2")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^step_(\d{8})\.tmp$")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); the partial write is removed, older checkpoints
    are untouched. One line."""


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
    """(complete, incomplete) checkpoint URLs, each sorted by step, oldest first.

    Only directories named as this format names them count: `step_<8 digits>` (complete when it has the
    marker) and `step_<8 digits>.tmp` (a write in progress or interrupted). Anything else under the
    checkpoint directory (a user's `step_abc/`, notes, ...) is not a checkpoint and is never touched.
    """
    fs, root = _fs(ckpt_dir)
    if not fs.exists(root):
        return [], []
    complete, incomplete = [], []
    for p in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(p.rstrip("/"))
        if not (_STEP_DIR.match(name) or _TMP_DIR.match(name)) or not fs.isdir(posixpath.join(root, name)):
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


def _read_meta(fs: fsspec.AbstractFileSystem, root: str, url: str) -> tuple[dict | None, str | None]:
    try:
        meta = json.loads(fs.cat_file(posixpath.join(root, "meta.json")))
    except FileNotFoundError:
        return None, f"checkpoint {url}: no meta.json (not written by this format, or damaged)"
    except Exception as e:  # noqa: BLE001 - any unreadable meta means an unusable checkpoint
        return None, f"checkpoint {url}/meta.json: unreadable ({type(e).__name__}: {one_line(e, 200)})"
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or not meta["files"]:
        return None, f"checkpoint {url}/meta.json: no file list (not written by this format, or damaged)"
    return meta, None


def verify(url: str, checksums: bool = False) -> str | None:
    """None if the checkpoint is complete and every file listed in meta.json is there with its recorded size
    (and, with `checksums`, its recorded block checksums), else one line saying what is wrong."""
    fs, root = _fs(url)
    if not fs.exists(root):
        return f"checkpoint {url}: no such directory"
    if not fs.isdir(root):
        return f"checkpoint {url}: not a directory"
    if not fs.exists(posixpath.join(root, COMPLETE)):
        return f"checkpoint {url}: incomplete (no {COMPLETE} marker)"
    meta, problem = _read_meta(fs, root, url)
    if problem is not None:
        return problem
    for rel, size in meta["files"].items():
        path = posixpath.join(root, rel)
        if not fs.exists(path):
            return f"checkpoint {url}/{rel}: missing"
        actual = fs.size(path)
        if actual != size:
            return f"checkpoint {url}/{rel}: {actual} bytes, expected {size} (truncated or overwritten)"
    return integrity.verify_checksums(url, meta) if checksums else None


def warn_incomplete(complete: list[str], incomplete: list[str]) -> None:
    """Say which incomplete checkpoints (from `list_checkpoints`) are newer than the newest complete one: the
    ones a user may expect a resume to use."""
    newest = _step_of(complete[-1]) if complete else -1
    for url in incomplete:
        if _step_of(url) > newest:
            D.warn0(f"checkpoint {url} is incomplete (no {COMPLETE} marker): skipped")


def without_url(why: str, url: str) -> str:
    """'checkpoint <url>/dcp/x: problem' -> 'dcp/x: problem', for lines that name the checkpoint already."""
    head = f"checkpoint {url}"
    return why[len(head):].lstrip("/: ") if why.startswith(head) else why


def find_latest(ckpt_dir: str, report: bool = True) -> str | None:
    """Newest complete checkpoint that passes `verify`; incomplete/corrupt ones are reported and skipped."""
    complete, incomplete = list_checkpoints(ckpt_dir)
    if report:
        warn_incomplete(complete, incomplete)
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


def explain_missing(path: str) -> str:
    """Why `path` names no usable checkpoint, in a few words (for the one-line errors of the callers)."""
    fs, root = _fs(path)
    if not fs.exists(root):
        return "no such directory"
    if not fs.isdir(root):
        return "not a directory"
    problem = verify(path)
    if problem is not None and fs.exists(posixpath.join(root, COMPLETE)):
        return without_url(problem, path)
    return "no complete checkpoint there (expected a step_N dir, a checkpoints dir or a run dir)"


def read_json(url: str, name: str) -> dict:
    """A JSON object file of a checkpoint; anything else is a CheckpointReadError naming the file."""
    fs, root = _fs(url)
    try:
        data = json.loads(fs.cat_file(posixpath.join(root, name)))
    except FileNotFoundError:
        raise CheckpointReadError(f"checkpoint {url}/{name}: missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointReadError(f"checkpoint {url}/{name}: not valid JSON ({one_line(e, 120)})"
                                  ) from None
    if not isinstance(data, dict):
        raise CheckpointReadError(f"checkpoint {url}/{name}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(url: str) -> str:
    """The resolved config.yaml text stored in a checkpoint."""
    fs, root = _fs(url)
    path = posixpath.join(root, "config.yaml")
    if not fs.exists(path):
        raise CheckpointReadError(f"checkpoint {url}: no config.yaml")
    try:
        return fs.cat_file(path).decode()
    except UnicodeDecodeError:
        raise CheckpointReadError(f"checkpoint {url}/config.yaml: not UTF-8 text") from None


def read_config_dict(url: str) -> dict:
    """The checkpoint's resolved config as a mapping (yaml.safe_load: tags that would build objects are
    refused); damage is a CheckpointReadError naming the file."""
    try:
        data = yaml.safe_load(read_config(url))
    except yaml.YAMLError as e:
        raise CheckpointReadError(f"checkpoint {url}/config.yaml: not a plain YAML mapping "
                                  f"({one_line(e, 120)})") from None
    if not isinstance(data, dict):
        raise CheckpointReadError(f"checkpoint {url}/config.yaml: expected a mapping, got {type(data).__name__}")
    return data


def read_rng(url: str, rank: int) -> dict | None:
    """This rank's saved RNG state, or None if the checkpoint was written by fewer ranks."""
    fs, root = _fs(url)
    path = posixpath.join(root, "rng", f"rank_{rank}.pt")
    if not fs.exists(path):
        return None
    try:
        return torch.load(io.BytesIO(fs.cat_file(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses anything but tensors and plain containers
        raise CheckpointReadError(f"checkpoint {url}/rng/rank_{rank}.pt: unreadable ({type(e).__name__}: "
                                  f"{one_line(e, 160)})") from None


def _tokenizer_files(tok: Tokenizer, spec: str) -> dict[str, bytes]:
    info = {"spec": spec, "name": tok.name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
            "definition": tok.definition()}
    files = {}
    if spec not in BUILTIN_TOKENIZERS:  # the checkpoint must not depend on a file elsewhere
        import tempfile

        name = HF_TOKENIZER_FILE if isinstance(tok, HFTokenizer) else TOKENIZER_FILE
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(Path(tmp) / name)
            files[name] = (Path(tmp) / name).read_bytes()
        info["file"] = name
    files[TOKENIZER_RECORD] = json.dumps(info, indent=1).encode()
    return files


# The project's own tokenizer files carry its name, so that nothing mistakes them for Hugging Face's
# `tokenizer.json` (a different format: `tools/checkpoint.py export-hf` writes that one). Checkpoints
# written before the rename hold the LEGACY_* names, which are still read.
TOKENIZER_RECORD = "llm_dist_tokenizer.json"  # spec, name, vocab size, fingerprint (+ "file" for a stored BPE)
TOKENIZER_FILE = "llm_dist_tokenizer.bpe.json"  # a trained / extended BPE, BPETokenizer.save's format
HF_TOKENIZER_FILE = "hf_tokenizer.json"  # an imported Hugging Face tokenizer (HFTokenizer.save's format)
LEGACY_TOKENIZER_RECORD, LEGACY_TOKENIZER_FILE = "tokenizer.json", "tokenizer.bpe.json"


def tokenizer_record_name(url: str) -> str:
    """The name of the checkpoint's tokenizer record: the current one, or the legacy one if only that exists."""
    fs, root = _fs(url)
    if not fs.exists(posixpath.join(root, TOKENIZER_RECORD)) and fs.exists(posixpath.join(root, LEGACY_TOKENIZER_RECORD)):
        return LEGACY_TOKENIZER_RECORD
    return TOKENIZER_RECORD


def load_checkpoint_tokenizer(url: str) -> Tokenizer:
    """The tokenizer a checkpoint was trained with, checked against its recorded fingerprint.

    Every failure (a damaged record, a file it names that is not this format's, a changed tokenizer) is a
    CheckpointReadError naming the file, so generate, evaluate, init_from and resume all treat a bad
    tokenizer the same way.
    """
    record = tokenizer_record_name(url)
    info = read_json(url, record)
    spec, fingerprint = info.get("spec"), info.get("fingerprint")
    if not isinstance(spec, str) or not isinstance(fingerprint, str):
        raise CheckpointReadError(f"checkpoint {url}/{record}: expected string 'spec' and 'fingerprint'")
    try:
        if "file" in info:
            # A fixed name, never a path that could point outside the checkpoint.
            allowed = (TOKENIZER_FILE, HF_TOKENIZER_FILE) if record == TOKENIZER_RECORD else (LEGACY_TOKENIZER_FILE,)
            if info["file"] not in allowed:
                raise CheckpointReadError(f"checkpoint {url}/{record}: 'file' must be one of "
                                          f"{', '.join(map(repr, allowed))}, got {info['file']!r}")
            import tempfile

            fs, root = _fs(url)
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / info["file"]
                local.write_bytes(fs.cat_file(posixpath.join(root, info["file"])))
                tok = load_tokenizer(local)
        elif spec in BUILTIN_TOKENIZERS:
            tok = load_tokenizer(spec)
        else:
            raise CheckpointReadError(f"checkpoint {url}/{record}: spec {spec!r} is neither a built-in "
                                      f"tokenizer {BUILTIN_TOKENIZERS} nor stored in the checkpoint")
    except CheckpointReadError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged stored tokenizer file, whatever the parser says
        raise CheckpointReadError(f"checkpoint {url}/{info.get('file', record)}: unreadable tokenizer "
                                  f"({type(e).__name__}: {one_line(e, 160)})") from None
    if tok.fingerprint() != fingerprint:
        raise CheckpointReadError(f"checkpoint {url}: tokenizer {spec!r} now has fingerprint {tok.fingerprint()}, "
                                  f"but the checkpoint was trained with {fingerprint}")
    return tok


def nonfinite_tensor(state: Any, prefix: str = "") -> str | None:
    """The name of the first floating tensor in a (nested) state dict holding NaN or Inf, else None.

    Local shards only (DTensor.to_local): each rank checks what it holds, the caller agrees across ranks.
    Loading NaNs would make the run train on, and then save, garbage.
    """
    if isinstance(state, dict):
        for k, v in state.items():
            found = nonfinite_tensor(v, f"{prefix}{k}.")
            if found is not None:
                return found
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            found = nonfinite_tensor(v, f"{prefix}{i}.")
            if found is not None:
                return found
    elif isinstance(state, torch.Tensor):
        t = state.to_local() if hasattr(state, "to_local") else state
        # A sum is finite exactly when no element is NaN/Inf, unless finite values overflow it: one read of
        # the tensor (25x faster than isfinite().all(), which writes a bool per element); the exact check
        # runs only to confirm a non-finite sum.
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum())) \
                and not bool(torch.isfinite(t).all()):
            return prefix.rstrip(".")
    return None


def _rank_share(meta: dict) -> list[str]:
    """The files this rank checks when every rank verifies a share of a checkpoint's checksums."""
    rels = sorted((meta.get("checksums") or {}).get("files", {}))
    rank, world = D.get_rank(), D.get_world_size()
    return rels[rank::world]


def _load_checked(url: str, meta: dict, state: dict, partial: bool, rels: list[str] | None) -> str | None:
    """Fill `state` from the checkpoint's shards while the checksums of `rels` (None: all files; meta without
    a record: none) are checked alongside, then check the loaded tensors are finite. Returns this process's
    one-line problem, or None. A refused (unsafe) index is raised, never returned: nobody falls back from it."""
    try:
        integrity.run_verified(url, meta, lambda: sharded.load(state, _url(url, "dcp"), partial=partial), rels,
                               keep=(sharded.UnsafeCheckpointError,))
    except sharded.UnsafeCheckpointError:
        raise
    except (integrity.ChecksumMismatch, CheckpointReadError) as e:  # DCP's failures name the cause too
        return str(e)
    bad = nonfinite_tensor(state)
    return f"checkpoint {url}: {bad} holds NaN/Inf values (refusing to train on them)" if bad is not None else None


def load_checkpoint(url: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, checksums: bool = True,
                    trainable_only: bool = False) -> dict:
    """Restore model + optimizer in place (any sharding, collective) and return the run's small state.

    While DCP reads, each rank checks the checksums of its share of the files in the background; after it,
    each rank checks its loaded shards are finite. The ranks agree (one small all-gather) and all raise the
    same CheckpointReadError naming the first problem, so callers fall back to an older checkpoint together.
    Returns {"train_state", "rng" (this rank's, None if the writer had fewer ranks), "meta", "url"}.
    `trainable_only`: the checkpoint holds only the parameters that train (LoRA adapters; see lora_base).
    """
    meta = read_json(url, "meta.json")
    state = sharded.model_optim_state(model, optimizer, trainable_only)
    # A refused index is raised on every rank alike (they read the same file): all stop, nobody falls back.
    problem = D.agree_on_problem(_load_checked(url, meta if checksums else {}, state, False, _rank_share(meta)))
    if problem is not None:
        raise CheckpointReadError(problem)
    sharded.apply_model_optim_state(model, optimizer, state, trainable_only)
    return {"train_state": read_json(url, "train_state.json"), "rng": read_rng(url, D.get_rank()),
            "meta": meta, "url": url}


def load_checkpoint_weights(model: torch.nn.Module, url: str, trainable_only: bool = False) -> None:
    """Load a checkpoint's model weights into an unsharded model (one process; generate, evaluate, init_from,
    reward and reference models): checksums checked alongside, non-finite weights refused.

    A LoRA checkpoint (meta.json names a `lora_base`) holds only the adapters: loading it as full weights is
    refused (the rest of the model would keep its random init); `llm_dist.lora_checkpoint.load_weights`
    loads the base and then the adapters (`trainable_only`: the parameters with requires_grad only)."""
    meta = read_json(url, "meta.json")
    if "lora_base" in meta and not trainable_only:
        raise CheckpointReadError(f"checkpoint {url} holds LoRA adapters only (base: {meta['lora_base'].get('url')}); "
                                  "load it with llm_dist.lora_checkpoint.load_weights, or fold the adapters into "
                                  "full weights with tools/checkpoint.py merge-lora")
    full = model.state_dict()
    keep = {n.replace("._checkpoint_wrapped_module", "") for n, p in model.named_parameters() if p.requires_grad}
    sd = {"model": {k: v for k, v in full.items() if k in keep} if trainable_only else full}
    problem = _load_checked(url, meta, sd, not trainable_only, None)  # every adapter must be there
    if problem is not None:
        raise CheckpointReadError(problem)
    model.load_state_dict(sd["model"], strict=not trainable_only)


class CheckpointManager:
    """Saves (sync or async) and prunes checkpoints under `ckpt_dir`. Collective: call on every rank."""

    def __init__(self, ckpt_dir: str, keep_last_k: int = 3, async_save: bool = False, checksums: bool = True) -> None:
        self.dir = str(ckpt_dir)
        self.checksums = checksums  # record every file's block CRCs in meta.json (see integrity.py)
        self.keep_last_k = keep_last_k
        self.async_save = async_save
        self.fs, self.root = _fs(self.dir)
        # A gloo group of its own for the background writes: DCP's collectives (plan gather, metadata)
        # then never interleave with the training's NCCL/gloo collectives on the default group.
        self._group = dist.new_group(backend="gloo") if async_save and D.get_world_size() > 1 else None
        # One stager for the whole run: its CPU buffers are reused by every save instead of reallocated.
        self._stager = sharded.make_stager() if async_save else None
        self._pending: tuple[Future, Callable[[], None], str] | None = None
        self._staging: Future | None = None

    def latest(self) -> str | None:
        return find_latest(self.dir)

    def save(self, step: int, model_optim: dict, train_state: dict, config_yaml: str, tokenizer: Tokenizer,
             tokenizer_spec: str, meta: dict | None = None) -> str:
        """Write checkpoint `step`. Returns its final URL (complete now, or once the async write finishes).

        A failed write (a full disk, a vanished directory) removes the partial `step_N.tmp/` and raises
        CheckpointWriteError on every rank, naming the directory and the newest checkpoint still intact.
        """
        self.wait()  # at most one save in flight
        rank = D.get_rank()
        name = step_dir_name(step)
        tmp = posixpath.join(self.root, name + ".tmp")
        t0 = time.perf_counter()
        problem = None
        if rank == 0:
            try:
                if self.fs.exists(tmp):  # left by a crash while writing this same step: incomplete by design
                    self.fs.rm(tmp, recursive=True)
                self.fs.makedirs(posixpath.join(tmp, "rng"), exist_ok=True)
            except OSError as e:
                problem = self._write_problem(tmp, e)
        problem = D.agree_on_problem(problem)  # also: the tmp dir exists before any rank writes into it
        if problem is None:
            rng_bytes = _torch_bytes(get_rng_state())
            extra_sums = {f"rng/rank_{rank}.pt": integrity.crc_bytes(rng_bytes)}
            try:
                _write_bytes(self.fs, posixpath.join(tmp, "rng", f"rank_{rank}.pt"), rng_bytes)
                if rank == 0:
                    files = {"train_state.json": json.dumps(train_state, indent=1).encode(),
                             "config.yaml": config_yaml.encode(), **_tokenizer_files(tokenizer, tokenizer_spec)}
                    for rel, data in files.items():
                        _write_bytes(self.fs, posixpath.join(tmp, rel), data)
                        extra_sums[rel] = integrity.crc_bytes(data)
            except OSError as e:
                problem = self._write_problem(tmp, e)
            problem = D.agree_on_problem(problem)  # a local write failed on some rank: nobody starts DCP
        if problem is not None:
            self._abort(tmp, problem)
        info = {"step": step, "world_size": D.get_world_size(), "time": time.time(), **(meta or {})}
        try:
            self._staging, fut = sharded.save(model_optim, _url(self.dir, name + ".tmp", "dcp"),
                                              process_group=self._group, asynchronous=self.async_save,
                                              stager=self._stager,
                                              sums_root=_url(self.dir, name + ".tmp") if self.checksums else None,
                                              extra_sums=extra_sums)
        except BaseException as e:  # DCP raises the same CheckpointException (a BaseException) on every rank
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            self._abort(tmp, self._write_problem(tmp, e))
        blocked = time.perf_counter() - t0
        finalize = lambda: self._finalize(step, tmp, info, t0)  # noqa: E731
        if fut is None:
            D.barrier()  # every rank's shards, RNG and sums files are written
            problem = None
            if rank == 0:
                try:
                    finalize()
                except OSError as e:
                    problem = self._write_problem(tmp, e)
            problem = D.agree_on_problem(problem)  # nobody races ahead (to exit or prune) before it is final
            if problem is not None:
                self._abort(tmp, problem)
        else:
            self._pending = (fut, finalize, tmp)
            D.print0(f"checkpoint step {step}: async save started (training blocked {blocked:.2f}s)")
        self.last_blocking_s = blocked
        return _url(self.dir, name)

    def _write_problem(self, tmp: str, exc: BaseException) -> str:
        """One line for a failed write: a full disk said as such, anything else by its first cause."""
        complete, _ = list_checkpoints(self.dir)
        intact = [u for u in complete if verify(u) is None]
        kept = f"{posixpath.basename(intact[-1])} is intact" if intact else "no earlier checkpoint exists"
        cause = _root_cause(exc)
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on device writing {tmp}; {kept}"
        detail = one_line(cause, 200)
        return f"checkpoint write failed in {tmp} ({type(cause).__name__}: {detail}); {kept}"

    def _abort(self, tmp: str, problem: str) -> None:
        """Every rank: remove the partial write (rank 0), then raise the same one-line error."""
        if D.get_rank() == 0:
            for path in (tmp, tmp[: -len(".tmp")] if tmp.endswith(".tmp") else None):
                # the final name too, if the rename happened but the marker could not be written
                if path and self.fs.exists(path) and not self.fs.exists(posixpath.join(path, COMPLETE)):
                    try:
                        self.fs.rm(path, recursive=True)
                    except OSError:
                        pass  # best effort: an unmarked directory is never loaded, and is pruned later
        raise CheckpointWriteError(problem)

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
            futures_wait([self._pending[0]])  # a failure is raised, as one line, by _complete_pending
            self._complete_pending()

    def _complete_pending(self) -> None:
        fut, finalize, tmp = self._pending
        self._pending = None
        try:
            fut.result()  # re-raises a failed background write
            if D.get_rank() == 0:
                finalize()
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            self._abort(tmp, self._write_problem(tmp, e))

    def _finalize(self, step: int, tmp: str, info: dict, t0: float) -> None:
        """Rank 0: checksums -> meta.json -> rename -> COMPLETE marker -> verify -> prune.

        Nothing is pruned unless the new checkpoint verifies (sizes and checksums recorded), and only
        checkpoints this format wrote and that verify are counted towards `keep_last_k`.
        """
        sums = integrity.collect_rank_sums(self.fs, tmp)  # every rank's shard and RNG checksums
        sums_dir = posixpath.join(tmp, integrity.SUMS_DIR)
        if self.fs.exists(sums_dir):
            self.fs.rm(sums_dir, recursive=True)
        sizes = {}
        for p in self.fs.find(tmp):
            rel = posixpath.relpath(p, tmp)
            sizes[rel] = self.fs.size(p)
        extra = {}
        if self.checksums:
            missing = {rel: posixpath.join(tmp, rel) for rel in sizes if rel not in sums}  # e.g. DCP's metadata
            sums.update(integrity.file_checksums(self.fs, missing))
            extra["checksums"] = integrity.checksum_record({rel: sums[rel] for rel in sizes})
        _write_bytes(self.fs, posixpath.join(tmp, "meta.json"),
                     json.dumps({**info, "files": sizes, **extra}, indent=1).encode())
        final = posixpath.join(self.root, step_dir_name(step))
        if self.fs.exists(final):  # re-saving a step (e.g. after resuming from it): replace the old copy
            marker = posixpath.join(final, COMPLETE)
            if self.fs.exists(marker):
                self.fs.rm(marker)
            self.fs.rm(final, recursive=True)
        self.fs.mv(tmp, final, recursive=True)
        _write_bytes(self.fs, posixpath.join(final, COMPLETE), f"{step}\n".encode())
        url = _url(self.dir, step_dir_name(step))
        problem = verify(url)
        if problem is not None:  # never prune on the strength of a checkpoint that does not verify
            D.warn0(f"{problem}; nothing pruned")
            return
        self._prune(step)
        D.print0(f"checkpoint saved: {url} ({time.perf_counter() - t0:.1f}s)")

    def _prune(self, newest: int) -> None:
        """Delete verified checkpoints beyond the newest keep_last_k, and this format's partial writes
        (`step_N.tmp/`, or `step_N/` with a meta.json but no marker: an interrupted delete) older than
        `newest`.

        Only directories this format names and writes are candidates: a complete-looking directory that
        does not verify (a stray `step_00000099/` holding only a marker, a damaged checkpoint) neither
        counts towards keep_last_k nor is deleted, and neither is anything not named `step_<8 digits>`.
        """
        complete, incomplete = list_checkpoints(self.dir)
        doomed = []
        for url in incomplete:
            name = posixpath.basename(url)
            if _step_of(url) >= newest:
                continue
            _, path = _fs(url)
            if _TMP_DIR.match(name) or self.fs.exists(posixpath.join(path, "meta.json")):
                doomed.append(url)
        if self.keep_last_k > 0:
            older = [u for u in complete if _step_of(u) != newest and verify(u) is None]
            doomed += older[: max(0, len(older) + 1 - self.keep_last_k)]
        for url in doomed:
            _, path = _fs(url)
            marker = posixpath.join(path, COMPLETE)
            if self.fs.exists(marker):  # marker first: an interrupted delete leaves an *incomplete* dir
                self.fs.rm(marker)
            self.fs.rm(path, recursive=True)


def _root_cause(exc: BaseException) -> BaseException:
    """The underlying error of a failed save: DCP wraps each rank's exception in a CheckpointException
    (failures: rank -> exception or (exception, traceback)); torch.save's zip writer reports a full disk as
    'unexpected pos' with the OSError as its context."""
    seen = set()
    stack = [exc]
    first_os = None
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return e
            first_os = first_os or e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                stack.append(f[0] if isinstance(f, tuple) else f)
        stack += [e.__cause__, e.__context__]
        try:
            text = str(e)
        except Exception:  # noqa: BLE001 - a malformed exception must not hide the real error
            text = ""
        if "No space left on device" in text:
            return OSError(errno.ENOSPC, "No space left on device")
    return first_os or exc
