"""Atomic checkpoint directories: write to `step_N.tmp/`, mark complete last, then rename.

Layout of one checkpoint (`<out_dir>/checkpoints/step_00001000/`):

    state.pt          model, optimizer, grad scaler, trainer counters, data-loader position (rank 0 writes)
    rng/rank_<r>.pt   each rank's python/numpy/torch/CUDA RNG state
    config.yaml       the resolved run config
    tokenizer.json    which tokenizer the ids belong to (config spec, fingerprint, definition)
    tokenizer.bpe.json  the trained tokenizer itself, when it is not a built-in ("byte", "gpt2")
    meta.json         step, tokens seen, world size, time, list of files
    COMPLETE          written last; a directory without it is never loaded

A crash at any moment leaves either the previous complete checkpoints untouched plus a `.tmp` directory
(ignored, and removed when that step is saved again), or a new complete checkpoint. Every `.pt` file is
read with `torch.load(weights_only=True)`: nothing in a checkpoint can run code on load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from llm_dist import distributed as D
from llm_dist.checkpoint.rng import get_rng_state
from llm_dist.tokenizer import Tokenizer, load_tokenizer

BUILTIN_TOKENIZERS = ("byte", "gpt2")

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint directories, each sorted by step, oldest first."""
    root = Path(ckpt_dir)
    complete, incomplete = [], []
    if not root.is_dir():
        return complete, incomplete
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file():
            complete.append(p)
        elif p.name.startswith("step_"):
            incomplete.append(p)
    return complete, incomplete


def find_latest(ckpt_dir: str | os.PathLike, report: bool = True) -> Path | None:
    """Newest complete checkpoint in `ckpt_dir`, or None. Incomplete ones are reported and skipped."""
    complete, incomplete = list_checkpoints(ckpt_dir)
    if report:
        newest = int(complete[-1].name[5:]) if complete else -1
        for p in incomplete:
            m = re.match(r"step_(\d+)", p.name)
            if m and int(m.group(1)) > newest:
                D.warn0(f"checkpoint {p} is incomplete (no {COMPLETE} marker): skipped")
    return complete[-1] if complete else None


def _check_complete(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: no such directory")
    if not (path / COMPLETE).is_file():
        raise RuntimeError(f"checkpoint {path}: incomplete (no {COMPLETE} marker); refusing to load it")


def load_checkpoint(path: str | os.PathLike, rank: int = 0, map_location: str | torch.device = "cpu") -> dict:
    """Read a complete checkpoint: {"state": ..., "rng": this rank's RNG or None, "meta": ..., "path": ...}."""
    path = Path(path)
    _check_complete(path)
    try:
        state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or corrupted file: name it, don't dump a pickle traceback
        raise RuntimeError(f"checkpoint {path / 'state.pt'}: cannot be read ({type(e).__name__}: {e})") from None
    rng_file = path / "rng" / f"rank_{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    meta = json.loads((path / "meta.json").read_text())
    return {"state": state, "rng": rng, "meta": meta, "path": path}


def _save_tokenizer(ckpt: Path, tok: Tokenizer, spec: str) -> None:
    info = {"spec": spec, "name": tok.name, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
            "definition": tok.definition()}
    if spec not in BUILTIN_TOKENIZERS:
        tok.save(ckpt / "tokenizer.bpe.json")  # the checkpoint must not depend on a file elsewhere
        info["file"] = "tokenizer.bpe.json"
    _write_text(ckpt / "tokenizer.json", json.dumps(info, indent=1))


def load_checkpoint_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a checkpoint was trained with, checked against its recorded fingerprint."""
    path = Path(path)
    info = json.loads((path / "tokenizer.json").read_text())
    tok = load_tokenizer(path / info["file"] if "file" in info else info["spec"])
    if tok.fingerprint() != info["fingerprint"]:
        raise RuntimeError(f"checkpoint {path}: tokenizer {info['spec']!r} now has fingerprint {tok.fingerprint()}, "
                           f"but the checkpoint was trained with {info['fingerprint']}")
    return tok


def read_config(path: str | os.PathLike) -> str:
    """The resolved config.yaml text stored in a checkpoint."""
    p = Path(path) / "config.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no config.yaml")
    return p.read_text()


class CheckpointManager:
    """Saves and finds checkpoints in `<out_dir>/checkpoints`. Collective: call `save` on every rank."""

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last_k: int = 3) -> None:
        self.dir = Path(ckpt_dir)
        self.keep_last_k = keep_last_k

    def latest(self) -> Path | None:
        return find_latest(self.dir)

    def save(self, step: int, state: dict, config_yaml: str, tokenizer: Tokenizer, tokenizer_spec: str,
             meta: dict | None = None) -> Path:
        """Write checkpoint `step` atomically. `state` is rank 0's (model/optimizer/...); RNG is per rank."""
        rank = D.get_rank()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / (step_dir_name(step) + ".tmp")
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash while writing this same step: incomplete by construction
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        D.barrier()  # the tmp dir exists before any rank writes into it
        _save_torch(get_rng_state(), tmp / "rng" / f"rank_{rank}.pt")
        D.barrier()  # every rank's RNG file is on disk before rank 0 marks the checkpoint complete
        if rank == 0:
            t0 = time.time()
            _save_torch(state, tmp / "state.pt")
            _write_text(tmp / "config.yaml", config_yaml)
            _save_tokenizer(tmp, tokenizer, tokenizer_spec)
            info = {"step": step, "world_size": D.get_world_size(), "time": time.time(),
                    "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()), **(meta or {})}
            _write_text(tmp / "meta.json", json.dumps(info, indent=1))
            _fsync_dir(tmp / "rng")
            _write_text(tmp / COMPLETE, f"{step}\n")  # the marker goes last: its presence means all is there
            _fsync_dir(tmp)
            if final.exists():  # re-saving a step (e.g. after resuming from it): replace the old copy
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            self._prune(keep=final)
            D.print0(f"checkpoint saved: {final} ({time.time() - t0:.1f}s)")
        D.barrier()  # nobody races ahead (e.g. to exit) before the checkpoint is final
        return final

    def _prune(self, keep: Path) -> None:
        """Delete the oldest complete checkpoints beyond keep_last_k; never the newest (just written)."""
        if self.keep_last_k <= 0:
            return
        complete, _ = list_checkpoints(self.dir)
        old = [p for p in complete if p != keep][: max(0, len(complete) - self.keep_last_k)]
        for p in old:
            # Remove the marker first: an interrupted delete must leave an *incomplete* dir, never a
            # "complete" one with files missing.
            (p / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
