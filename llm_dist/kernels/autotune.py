"""Choosing launch configurations for the attention kernels: curated candidates, bucketed keys, a disk cache.

A kernel launch is keyed on (kernel, head dim, causal, windowed, GQA group, dtype, and the *buckets* of the
query and key lengths: the next power of two, at least 16). Lengths in one bucket share a key, so
varied lengths (SFT packing, RL rollouts, evaluation) reuse the configuration chosen for the first
length of their bucket; the kernels do not specialise on the lengths either (`do_not_specialize`), so
they reuse the compiled binary too.

For a key seen for the first time, `Tuner.pick` compiles and times each candidate on the real arguments
(`triton.testing.do_bench`; every attention kernel overwrites its outputs, so re-running is harmless)
and keeps the fastest. `LLM_DIST_AUTOTUNE` selects the candidates:

    curated (default, also when unset or empty)  a few configurations per kernel and head dim, chosen for
                                                 Hopper (sm90) or Ampere (sm80): <= 3 compiles per kernel
    reduced                                      the first curated one only, no timing, no cache (tests and
                                                 correctness runs)
    full                                         every configuration of the original search space

Anything else raises a ValueError naming the accepted values. Choices are persisted per GPU model as JSON
in `~/.cache/llm_dist/autotune/<gpu name>.json` (the directory is overridable with
`LLM_DIST_AUTOTUNE_CACHE`), so a new process pays only the compile (itself cached by Triton). The file is
data only (read with `json.loads`, every field checked); a file that does not parse or check is ignored
with a one-line warning and replaced at the next write. Writes merge with what is on disk and go through
a temporary file and `os.replace`, so concurrent ranks never see a half-written file (at worst one
rank's new entry is lost and tuned again later). An entry tuned under `full` satisfies every mode; a
`full` run re-tunes entries that were chosen from the curated set.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ENV_MODE = "LLM_DIST_AUTOTUNE"
ENV_CACHE = "LLM_DIST_AUTOTUNE_CACHE"
MODES = ("curated", "reduced", "full")
CACHE_VERSION = 1
_WARPS = (1, 2, 4, 8, 16, 32)
_BLOCKS = (16, 32, 64, 128, 256)


def autotune_mode(value: str | None = None) -> str:
    """The mode from `value` or the LLM_DIST_AUTOTUNE environment variable (unset/empty = curated)."""
    raw = os.environ.get(ENV_MODE, "") if value is None else value
    mode = raw.strip().lower() or "curated"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={raw!r} is not one of curated (the default), reduced, full")
    return mode


def seq_bucket(n: int) -> int:
    """The autotune bucket of a sequence length: the next power of two, at least 16."""
    n = max(int(n), 16)
    return 1 << (n - 1).bit_length()


def tune_key(kernel: str, n_q: int, n_k: int, head_dim: int, causal: bool, windowed: bool, group: int,
             dtype: object) -> str:
    """The cache key of one launch: everything that changes the best configuration, lengths bucketed."""
    dt = str(dtype).replace("torch.", "")
    return (f"{kernel}|D{head_dim}|causal{int(causal)}|windowed{int(windowed)}|group{group}|{dt}"
            f"|q{seq_bucket(n_q)}|k{seq_bucket(n_k)}")


@dataclass(frozen=True)
class Config:
    """One launch configuration of an attention kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def to_json(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    @staticmethod
    def from_json(d: object) -> "Config":
        """A Config from a cache entry; ValueError unless every field is an int in its range."""
        if not isinstance(d, dict):
            raise ValueError("entry is not an object")
        vals = {}
        for name, allowed in (("BLOCK_M", _BLOCKS), ("BLOCK_N", _BLOCKS), ("num_warps", _WARPS),
                              ("num_stages", range(1, 9))):
            v = d.get(name)
            if type(v) is not int or v not in allowed:
                raise ValueError(f"{name}={v!r} is not one of {tuple(allowed)}")
            vals[name] = v
        return Config(vals["BLOCK_M"], vals["BLOCK_N"], vals["num_warps"], vals["num_stages"])


# ------------------------------------------------------------------------------------------ disk cache

def cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llm_dist" / "autotune"


def cache_path(device_name: str) -> Path:
    """`<cache dir>/<gpu name>.json`, the name reduced to [A-Za-z0-9._-]."""
    return cache_dir() / (re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") + ".json")


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def load_cache(path: Path) -> dict[str, dict]:
    """{key: {"config": Config, "mode": str}} from `path`; {} when missing, or (with one warning) unreadable."""
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):  # nothing cached yet (a bad directory warns at the write)
        return {}
    except OSError as e:
        _warn_once(f"read:{path}", f"autotune cache {path} unreadable ({e.__class__.__name__}); ignoring it")
        return {}
    try:
        data = json.loads(text)
        ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict)
        if not ok:
            raise ValueError(f"not an llm_dist autotune cache of version {CACHE_VERSION}")
        out = {}
        for key, entry in data["entries"].items():
            mode = entry.get("mode") if isinstance(entry, dict) else None
            if mode not in MODES:
                raise ValueError(f"entry {key!r}: mode {mode!r}")
            out[str(key)] = {"config": Config.from_json(entry), "mode": mode}
        return out
    except (ValueError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
        _warn_once(f"corrupt:{path}", f"autotune cache {path} is corrupt ({str(e).splitlines()[0][:120]}); "
                                      "ignoring it (it is rewritten at the next tuning)")
        return {}


def save_cache(path: Path, device_name: str, new: dict[str, dict]) -> None:
    """Merge `new` ({key: {"config", "mode"}}) into the file at `path`, atomically; one warning if it cannot."""
    try:
        entries = load_cache(path)
        entries.update(new)
        doc = {"version": CACHE_VERSION, "device": device_name,
               "entries": {k: {**v["config"].to_json(), "mode": v["mode"]} for k, v in sorted(entries.items())}}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        _warn_once(f"write:{path}", f"autotune cache {path} not writable ({e.__class__.__name__}: {e.strerror}); "
                                    "the choices stay in memory for this process")


# ---------------------------------------------------------------------------------------------- tuner

Launch = Callable[[Config], None]
Bench = Callable[[Callable[[], None]], float]


def _do_bench(fn: Callable[[], None]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


class Tuner:
    """Picks, remembers and persists the configuration of one kernel per key.

    candidates(mode) -> the configurations to try, best guess first (already pruned for the shape); `reduced`
    (and the interpreter, device_name None) launches the first that runs, without timing or cache;
    bench(fn) -> milliseconds of fn (triton's do_bench by default; injectable for tests).
    """

    def __init__(self, kernel: str, bench: Bench | None = None) -> None:
        self.kernel = kernel
        self.bench = bench or _do_bench
        self.memory: dict[tuple[str, str], dict] = {}  # (device name, key) -> {"config", "mode"}
        self.loaded: set[str] = set()  # device names whose disk cache is in `memory`
        self.tuned = 0  # keys timed by this tuner (tests, benchmarks)

    def _from_disk(self, device_name: str) -> None:
        if device_name in self.loaded:
            return
        self.loaded.add(device_name)
        for key, entry in load_cache(cache_path(device_name)).items():
            self.memory.setdefault((device_name, key), entry)

    def run(self, key: str, candidates: Callable[[str], list[Config]], launch: Launch, device_name: str | None,
            mode: str | None = None) -> Config:
        """Launch with the configuration for `key`, choosing it first if needed; returns the one used.

        device_name None (the interpreter, CPU tests): no timing, no disk cache, the first candidate that runs.
        """
        mode = autotune_mode(mode)
        if device_name is None or mode == "reduced":
            return self._first_that_runs(key, candidates("reduced"), launch)
        self._from_disk(device_name)
        entry = self.memory.get((device_name, key))
        if entry is not None and (mode != "full" or entry["mode"] == "full"):
            try:
                launch(entry["config"])
                return entry["config"]
            except Exception as e:  # noqa: BLE001 - e.g. a config from another Triton version no longer compiles
                _warn_once(f"stale:{key}", f"autotune: cached {entry['config']} for {key} failed "
                                           f"({e.__class__.__name__}); tuning again")
        cfg = self._tune(key, candidates(mode), launch)
        self.memory[(device_name, key)] = {"config": cfg, "mode": mode}
        save_cache(cache_path(device_name), device_name, {key: {"config": cfg, "mode": mode}})
        launch(cfg)
        return cfg

    @staticmethod
    def _first_that_runs(key: str, configs: list[Config], launch: Launch) -> Config:
        """`reduced`: launch the first candidate that compiles (out of shared memory / registers: the next)."""
        error = None
        for cfg in configs:
            try:
                launch(cfg)
                return cfg
            except Exception as e:  # noqa: BLE001
                error = e
        raise RuntimeError(f"autotune: no configuration of {key} could run") from error

    def _tune(self, key: str, configs: list[Config], launch: Launch) -> Config:
        self.tuned += 1
        best, best_ms, error = None, float("inf"), None
        for cfg in configs:
            try:
                ms = self.bench(lambda cfg=cfg: launch(cfg))
            except Exception as e:  # noqa: BLE001 - out of shared memory / registers: not a candidate here
                error = e
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"autotune: no configuration of {key} could run") from error
        return best
