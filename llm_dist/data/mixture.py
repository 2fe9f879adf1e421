"""Weighted mixtures of corpora: the mixture file, preparing each source to its own shards, the draw order.

Mixture file (YAML or JSON; `data.mixture`, `tools/prepare_data.py --mixture`):

    sources:
      - {path: "fineweb-edu/*.parquet", weight: 0.7}
      - {path: code.jsonl.zst, weight: 0.3, text_field: content}

Relative paths are relative to the mixture file's folder. Each source is prepared into its own
sub-directory `<data.dir>/<NN>-<name>/` (an ordinary prepared directory), and `<data.dir>/mixture.json`
lists them with their weights; the loader (llm_dist/data/loader.py) sees such a directory as one split
whose samples are the sources' samples end to end, drawn in proportion to the weights by `MixtureOrder`.

Order. Positions are cut into blocks of `BLOCK` draws; source s gets quota_s of each block (the weights
rounded to whole draws by largest remainder), shuffled within the block by PCG64([seed, 0, block]). The
k-th draw from source s is that source's sample perm_{s,e}[k mod n_s], e = k // n_s, with perm_{s,e} =
PCG64([seed, 1 + s, e]).permutation(n_s): every source is gone through a whole epoch before any of its
samples repeats. Everything is a function of (seed, position), so resume and world-size changes work as
for a single source, and over any whole block the proportions are exact.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_dist.data.errors import DataPrepError

MIXTURE_NAME = "mixture.json"
MIXTURE_FORMAT = "llm_dist.mixture"
MIXTURE_VERSION = 1
BLOCK = 4096  # draws per block: weights are honoured to 1/BLOCK; a source below that share is refused


@dataclass(frozen=True)
class MixtureSource:
    """One corpus of a mixture: where it is, its share of the draws, and its text field."""

    path: str  # file, glob, folder or fsspec URL (relative: to the mixture file's folder)
    weight: float  # relative share of training samples drawn from it (> 0; normalised over sources)
    text_field: str | None = None  # JSONL key / parquet column; None: data.text_field (--text-field)


def read_mixture_file(path: str | os.PathLike) -> list[MixtureSource]:
    """Parse and check a mixture file; one-line DataPrepError naming the file and entry on any problem."""
    import yaml  # safe_load only: a mixture file cannot construct objects

    p = Path(path)
    if not p.is_file():
        raise DataPrepError(f"{path}: mixture file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataPrepError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    entries = data.get("sources") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise DataPrepError(f"{path}: expected 'sources:' with a list of {{path, weight}} entries")
    out = []
    for i, e in enumerate(entries):
        where = f"{path}: sources[{i}]"
        if not isinstance(e, dict) or set(e) - {"path", "weight", "text_field"} or "path" not in e:
            raise DataPrepError(f"{where}: expected a mapping with 'path', 'weight' and optionally 'text_field', "
                                f"got {e!r}")
        src, w = e["path"], e.get("weight", 1.0)
        if not isinstance(src, str) or not src:
            raise DataPrepError(f"{where}: path must be a non-empty string, got {src!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise DataPrepError(f"{where}: weight must be a finite number > 0, got {w!r}")
        tf = e.get("text_field")
        if tf is not None and (not isinstance(tf, str) or not tf):
            raise DataPrepError(f"{where}: text_field must be a non-empty string, got {tf!r}")
        if "://" not in src and not os.path.isabs(src):
            src = str(p.parent / src)
        out.append(MixtureSource(src, float(w), tf))
    quotas(np.array([s.weight for s in out]), where=str(path))
    return out


def source_dir_name(i: int, path: str) -> str:
    """Sub-directory of source i: "03-fineweb-edu" from "/data/fineweb-edu/*.parquet"."""
    parts = [q for q in re.split(r"[/\\]", path) if q and not any(c in q for c in "*?[")]
    stem = parts[-1] if parts else "source"
    stem = re.sub(r"\.(jsonl|ndjson|json|parquet|arrow|txt|gz|zst)$", "", stem, flags=re.I)
    stem = re.sub(r"\.(jsonl|ndjson|json|parquet|arrow|txt)$", "", stem, flags=re.I)
    return f"{i:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:40] or 'source'}"


def quotas(weights: np.ndarray, block: int = BLOCK, where: str = "mixture") -> np.ndarray:
    """Draws per block for each source: weights / sum * block rounded by largest remainder (sum = block)."""
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * block
    q = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - q), kind="stable")  # ties: the earlier source gets the extra draw
    q[order[: block - int(q.sum())]] += 1
    if (q == 0).any():
        i = int(np.argmin(q))
        raise DataPrepError(f"{where}: source {i}'s weight is below 1/{block} of the total; raise it or drop the source")
    return q


def write_mixture(out_dir: Path, names: list[str], sources: list[MixtureSource]) -> dict[str, Any]:
    """Atomically write `<out_dir>/mixture.json` naming each source's sub-directory and weight."""
    doc = {"format": MIXTURE_FORMAT, "version": MIXTURE_VERSION,
           "sources": [{"dir": n, "weight": s.weight, "source": s.path} for n, s in zip(names, sources)]}
    tmp = out_dir / f"{MIXTURE_NAME}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MIXTURE_NAME)
    return doc


def read_mixture(data_dir: Path) -> list[tuple[Path, float]] | None:
    """(sub-directory, weight) of each source of a mixture directory; None for an ordinary one."""
    from llm_dist.data.index import DataIndexError

    path = data_dir / MIXTURE_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert doc["format"] == MIXTURE_FORMAT and doc["version"] == MIXTURE_VERSION
        out = [(data_dir / str(s["dir"]), float(s["weight"])) for s in doc["sources"]]
        assert out and all(w > 0 and math.isfinite(w) and "/" not in d.name for d, w in out)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataIndexError(f"{path}: malformed mixture description ({type(e).__name__}: {e}); re-prepare the "
                             "directory") from None
    return out


class MixtureOrder:
    """Global position -> sample id in the sources' concatenated sample space (see the module doc)."""

    def __init__(self, n_samples: list[int], weights: list[float], seed: int, shuffle: bool,
                 block: int = BLOCK) -> None:
        self.n = np.asarray(n_samples, dtype=np.int64)  # [S]
        self.offsets = np.concatenate([[0], np.cumsum(self.n)])[:-1]  # [S] first global id of each source
        self.quota = quotas(np.asarray(weights), block)  # [S], sums to block
        self.block, self.seed, self.shuffle = block, int(seed), bool(shuffle)
        self._base = np.repeat(np.arange(len(self.n)), self.quota)  # [block] source of each slot, unshuffled
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each slot of block b, how many earlier slots of the block drew that source)."""
        hit = self._layouts.get(b)
        if hit is None:
            src = self._base
            if self.shuffle:
                src = np.random.Generator(np.random.PCG64([self.seed, 0, b])).permutation(self._base)
            rank = np.empty(self.block, dtype=np.int64)
            for s in range(len(self.n)):
                where = np.flatnonzero(src == s)
                rank[where] = np.arange(where.size)
            if len(self._layouts) >= 4:
                self._layouts.pop(min(self._layouts))
            hit = self._layouts[b] = (src, rank)
        return hit

    def _perm(self, s: int, e: int) -> np.ndarray:
        key = (s, e)
        p = self._perms.get(key)
        if p is None:
            p = np.random.Generator(np.random.PCG64([self.seed, 1 + s, e])).permutation(int(self.n[s]))
            stale = [k for k in self._perms if k[0] == s]
            if len(stale) >= 2:
                self._perms.pop(min(stale))
            self._perms[key] = p
        return p

    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> global sample ids (source offset + sample within the source)."""
        positions = np.asarray(positions, dtype=np.int64)
        blocks, slots = positions // self.block, positions % self.block
        src = np.empty_like(positions)
        draw = np.empty_like(positions)  # k: how many draws from this source came before
        for b in np.unique(blocks).tolist():
            m = blocks == b
            layout, rank = self._layout(b)
            src[m] = layout[slots[m]]
            draw[m] = b * self.quota[src[m]] + rank[slots[m]]
        out = np.empty_like(positions)
        for s in np.unique(src).tolist():
            m = src == s
            k = draw[m]
            local = k % self.n[s]
            if self.shuffle:
                epochs = k // self.n[s]
                for e in np.unique(epochs).tolist():
                    me = epochs == e
                    local[me] = self._perm(s, e)[local[me]]
            out[m] = self.offsets[s] + local
        return out
