"""Distributed, resumable loader over prepared token shards.

Samples. A split's shards are one token stream of N tokens. Sample k is the window
tokens[k*T : k*T + T + 1] (T = seq_len): inputs x = its first T tokens, targets y = its last T. Windows
start at non-overlapping offsets and may cross shard boundaries; there are n = (N - 1) // T of them.

Order. Training consumes an endless stream of *global positions* p = 0, 1, 2, ...; position p is epoch
e = p // n, slot i = p % n, and sample perm_e[i] with perm_e = PCG64([seed, e]).permutation(n) (or just i
when not shuffling). Nothing else enters the order, so it is the same for every world size and
micro-batch size, and epochs roll over mid-batch without a seam.

Batches. Each optimizer step consumes `global_batch` consecutive positions. Rank r of W takes the
contiguous slice [r*B/W, (r+1)*B/W) of them, cut into micro-batches of `micro_batch` sequences, and reads
only those windows from disk. Concatenating every rank's slices in rank order gives the W=1 batch.

Mixtures. A directory prepared from a mixture file (`mixture.json` + one prepared sub-directory per source,
llm_dist/data/mixture.py) is one split whose samples are the sources' samples end to end; training positions
map to them through `MixtureOrder` (sources drawn in proportion to their weights, still a function of seed
and position only), evaluation reads them in that concatenated order.

Resume. `state_dict()` is the global position only (epoch, slot), identical on every rank, so a loader
with any world size / micro-batch / global batch continues exactly where the saved one stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from llm_dist.data.index import INDEX_NAME, DataIndexError, read_index
from llm_dist.data.mixture import MixtureOrder, read_mixture

Batch = list[tuple[torch.Tensor, torch.Tensor]]
STATE_VERSION = 1
# Token ids are checked against the index's vocabulary when a loader opens: whole shards while a split's total
# stays under this many tokens, the rest batch by batch (see TokenStream.check_ids).
SCAN_IDS_MAX_TOKENS = 1 << 30
_SCAN_CHUNK = 1 << 24


class TokenStream:
    """A split's shards seen as one 1-D token array; shards are memory-mapped lazily, never read whole."""

    def __init__(self, data_dir: str | os.PathLike, index: dict[str, Any], split: str) -> None:
        self.data_dir = Path(data_dir)
        self.dtype = np.dtype(index["dtype"])
        shards = index["splits"][split]["shards"]
        self.files = [self.data_dir / s["file"] for s in shards]
        self.counts = [int(s["tokens"]) for s in shards]
        # bounds[j] = first global token of shard j; bounds[-1] = total tokens.
        self.bounds = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)
        self._bounds = self.bounds.tolist()  # Python ints: cheaper than numpy scalars in the per-row loop
        self._counts = np.asarray(self.counts, dtype=np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(self.files)
        self._sliding_views: dict[tuple[int, int], np.ndarray] = {}
        self.vocab_size: int | None = None  # set by check_ids
        self._checked = [False] * len(self.files)  # shard j's ids were all scanned at start-up
        self._all_checked = False  # every shard was: no per-batch check needed

    def __len__(self) -> int:
        return self._bounds[-1]

    def _shard(self, j: int) -> np.ndarray:
        m = self._maps[j]
        if m is None:
            # A plain ndarray view of the memmap: slicing np.memmap objects costs several µs per call
            # (subclass bookkeeping); the view still pages data in from the mapping on demand.
            m = np.memmap(self.files[j], dtype=self.dtype, mode="r", shape=(self.counts[j],)).view(np.ndarray)
            self._maps[j] = m
        return m

    def window(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as an array (a view when it lies inside one shard)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside the stream of {len(self)} tokens")
        j = int(np.searchsorted(self.bounds, start, side="right")) - 1
        return self._window(start, length, j)

    def _window(self, start: int, length: int, j: int) -> np.ndarray:
        off = start - self._bounds[j]
        if off + length <= self.counts[j]:
            return self._shard(j)[off : off + length]
        # Crosses one or more shard boundaries (shards may even be shorter than a window).
        parts, need = [], length
        while need > 0:
            piece = self._shard(j)[off : off + need]
            parts.append(piece)
            need -= piece.size
            j, off = j + 1, 0
        return np.concatenate(parts)

    def check_ids(self, vocab_size: int, max_scan_tokens: int | None = None) -> None:
        """Raise DataIndexError naming the shard if any token id is >= vocab_size (a damaged or foreign shard
        would otherwise fail as an IndexError deep inside the embedding, mid-training).

        Each shard is scanned once, in chunks of the mapping (no copy of the whole file), while the split's
        scanned total stays within `max_scan_tokens` (under 0.1 s per 100M cached tokens); beyond that the remaining
        shards are checked batch by batch as they are read (`check_window_ids`).
        """
        self.vocab_size = int(vocab_size)
        if self.dtype.kind == "u" and np.iinfo(self.dtype).max < vocab_size:
            self._checked = [True] * len(self.files)  # no stored value can be out of range
            self._all_checked = True
            return
        budget = SCAN_IDS_MAX_TOKENS if max_scan_tokens is None else max_scan_tokens
        for j, n in enumerate(self.counts):
            if n > budget:
                return
            budget -= n
            m = self._shard(j)
            for lo in range(0, n, _SCAN_CHUNK):
                hi_id = int(m[lo:lo + _SCAN_CHUNK].max())
                if hi_id >= vocab_size:
                    pos = lo + int(np.argmax(m[lo:lo + _SCAN_CHUNK] >= vocab_size))
                    raise DataIndexError(
                        f"{self.files[j]}: token id {int(m[pos])} at position {pos} is outside the vocabulary of "
                        f"{vocab_size} ids recorded in {INDEX_NAME} (damaged shard, or one from another dataset?); "
                        "re-prepare the directory")
            self._checked[j] = True
        self._all_checked = all(self._checked)

    def check_window_ids(self, win: np.ndarray, starts: np.ndarray) -> None:
        """Cheap per-batch guard for shards too large for the start-up scan: one max() over the batch."""
        if self._all_checked or self.vocab_size is None or not win.size or int(win.max()) < self.vocab_size:
            return
        row = int(np.argmax((win >= self.vocab_size).any(axis=1)))
        col = int(np.argmax(win[row] >= self.vocab_size))
        start = int(starts[row]) + col
        j = int(np.searchsorted(self.bounds, start, side="right")) - 1
        raise DataIndexError(
            f"{self.files[j]}: token id {int(win[row, col])} at position {start - self._bounds[j]} is outside the "
            f"vocabulary of {self.vocab_size} ids recorded in {INDEX_NAME} (damaged shard?); re-prepare the directory")

    def fingerprint(self, tokenizer_fingerprint: str | None, probes: int = 64, width: int = 16) -> str:
        """Short hash of the stream's content: length plus tokens at fixed probe positions.

        Independent of how the tokens are sharded (a re-sharded copy resumes fine) yet different for
        another corpus or tokenizer; reads only `probes` small windows, so it is cheap at start-up.
        """
        n = len(self)
        width = min(width, n)
        h = hashlib.sha256(f"{tokenizer_fingerprint}|{n}".encode())
        for start in np.linspace(0, n - width, probes).astype(np.int64).tolist():
            h.update(self.window(start, width).astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def gather(self, starts: np.ndarray, length: int) -> np.ndarray:
        """out[i] = tokens[starts[i] : starts[i] + length] -> [len(starts), length] in the storage dtype.

        Windows inside one shard are copied by a single fancy-index per shard from a sliding-window view
        of its mapping (no per-token or per-row Python); only shard-crossing windows go row by row.
        """
        starts = np.asarray(starts, dtype=np.int64)  # [n]
        if starts.size and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError(f"a window of {length} tokens falls outside the stream of {len(self)} tokens")
        out = np.empty((starts.size, length), dtype=self.dtype)  # [n, length]
        shard = np.searchsorted(self.bounds, starts, side="right") - 1  # [n] shard holding each start
        local = starts - self.bounds[shard]  # [n] offset inside that shard
        inside = local + length <= self._counts[shard]  # [n] window ends in the same shard
        for j in np.unique(shard[inside]).tolist():
            rows = np.flatnonzero(inside & (shard == j))
            out[rows] = self._sliding(j, length)[local[rows]]
        for i in np.flatnonzero(~inside).tolist():
            out[i] = self._window(int(starts[i]), length, int(shard[i]))
        return out

    def _sliding(self, j: int, length: int) -> np.ndarray:
        """Read-only [count - length + 1, length] view of shard j whose row r is tokens r .. r+length-1."""
        key = (j, length)
        view = self._sliding_views.get(key)
        if view is None:
            view = np.lib.stride_tricks.sliding_window_view(self._shard(j), length)
            self._sliding_views[key] = view
        return view


class ShardedLoader:
    """This rank's share of each global batch over one split of a prepared directory (see module doc).

    next_batch() -> [(x, y), ...]: global_batch // (world_size * micro_batch) micro-batches, each x, y int64
    [micro_batch, seq_len] on `device` (pinned host memory + non_blocking copies when it is CUDA).
    `shuffle=None` means: shuffle the train split, keep every other split in order.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, v in (("seq_len", seq_len), ("micro_batch", micro_batch), ("world_size", world_size)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds PCG64), got {seed}")
        self.data_dir = Path(data_dir)
        mixture = read_mixture(self.data_dir)
        parts = mixture if mixture is not None else [(self.data_dir, 1.0)]
        indexes = [read_index(d) for d, _ in parts]
        self.index = indexes[0]
        for (d, _), idx in zip(parts, indexes):
            if split not in idx["splits"]:
                have = ", ".join(idx["splits"]) or "none"
                raise DataIndexError(f"{d}: split {split!r} not present (splits: {have})")
            for key in ("dtype", "vocab_size", "eot_id"):
                if idx[key] != self.index[key]:
                    raise DataIndexError(f"{d}: {key} {idx[key]!r} differs from {parts[0][0]}'s {self.index[key]!r}: "
                                         "a mixture's sources must be prepared with one tokenizer")
        self.split = split
        self.seq_len = int(seq_len)
        self.micro_batch = int(micro_batch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.device = torch.device(device)
        self.streams = [TokenStream(d, idx, split) for (d, _), idx in zip(parts, indexes)]
        self.stream = self.streams[0]
        self.n_tokens = sum(len(st) for st in self.streams)
        counts = [(len(st) - 1) // self.seq_len for st in self.streams]  # samples of each source
        for (d, _), st, n in zip(parts, self.streams, counts):
            if n < 1:
                raise DataIndexError(
                    f"{d}: split {split!r} has {len(st)} tokens, fewer than seq_len + 1 = "
                    f"{self.seq_len + 1} (seq_len is the model's block_size): use a shorter context or prepare more data"
                )
        self.n_samples = sum(counts)
        self._first = np.cumsum([0] + counts)  # [S+1] first global sample id of each source
        for st in self.streams:
            st.check_ids(self.vocab_size)
        prints = [st.fingerprint(self.index["tokenizer"].get("fingerprint")) for st in self.streams]
        self.data_fingerprint = prints[0]
        self.mixture: list[float] | None = None  # the sources' weights, for a mixture directory
        self._order: MixtureOrder | None = None
        if mixture is not None:
            self.mixture = [w for _, w in mixture]
            self._order = MixtureOrder(counts, self.mixture, self.seed, self.shuffle)
            # Weights are part of the data: a resume with other weights would land elsewhere in the order.
            self.data_fingerprint = hashlib.sha256(json.dumps([prints, self.mixture]).encode()).hexdigest()[:16]
        self._consumed = 0  # global positions consumed since epoch 0, slot 0
        self._perms: dict[int, np.ndarray] = {}
        self.set_global_batch(global_batch)

    # -- configuration ----------------------------------------------------------------------------------

    def set_global_batch(self, global_batch: int) -> None:
        """Change sequences per optimizer step (batch-size ramps); the position, in samples, is unchanged."""
        unit = self.world_size * self.micro_batch
        if global_batch < 1 or global_batch % unit:
            raise ValueError(
                f"global_batch {global_batch} must be a positive multiple of world_size * micro_batch = "
                f"{self.world_size} * {self.micro_batch} = {unit}"
            )
        self.global_batch = int(global_batch)

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimizer step over all ranks (global_batch * seq_len)."""
        return self.global_batch * self.seq_len

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per step: the length of `next_batch()`'s list."""
        return self.global_batch // (self.world_size * self.micro_batch)

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.index["eot_id"])

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        """The index's tokenizer record: name, fingerprint, spec, definition."""
        return self.index["tokenizer"]

    @property
    def epoch(self) -> int:
        return self._consumed // self.n_samples

    @property
    def samples_consumed(self) -> int:
        """Global positions consumed since the start of epoch 0 (all ranks together)."""
        return self._consumed

    # -- order --------------------------------------------------------------------------------------------

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n_samples)
            # A batch spans at most two epochs when global_batch <= n_samples; keep just the newest few.
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = p
        return p

    def sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> sample ids: the sample-order rule (a function of seed, epoch, position only)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._order is not None:
            return self._order.sample_ids(positions)
        slots = positions % self.n_samples
        if not self.shuffle:
            return slots
        epochs = positions // self.n_samples
        out = np.empty_like(slots)
        for e in np.unique(epochs).tolist():
            m = epochs == e
            out[m] = self._perm(e)[slots[m]]
        return out

    # -- batches ------------------------------------------------------------------------------------------

    def _load(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of these samples as (x, y), int64 [len(sample_ids), seq_len] each, on self.device."""
        n, T = len(sample_ids), self.seq_len
        win = self._gather(np.asarray(sample_ids, dtype=np.int64))  # [n, T+1] storage dtype
        pin = self.device.type == "cuda"
        # Fresh buffers per call: a pinned buffer must not be refilled while its async copy may still be
        # running, and torch's caching host allocator makes the re-allocation cheap.
        x = torch.empty((n, T), dtype=torch.int64, pin_memory=pin)
        y = torch.empty((n, T), dtype=torch.int64, pin_memory=pin)
        x.numpy()[...] = win[:, :-1]  # widen uint16/uint32 -> int64 while copying
        y.numpy()[...] = win[:, 1:]
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        return x, y

    def _gather(self, sample_ids: np.ndarray) -> np.ndarray:
        """Token windows [len(sample_ids), T+1] of global sample ids (split among a mixture's sources)."""
        T = self.seq_len
        if len(self.streams) == 1:
            win = self.stream.gather(sample_ids * T, T + 1)
            self.stream.check_window_ids(win, sample_ids * T)
            return win
        win = np.empty((sample_ids.size, T + 1), dtype=self.stream.dtype)
        source = np.searchsorted(self._first, sample_ids, side="right") - 1  # [n]
        for s in np.unique(source).tolist():
            rows = np.flatnonzero(source == s)
            starts = (sample_ids[rows] - self._first[s]) * T
            win[rows] = self.streams[s].gather(starts, T + 1)
            self.streams[s].check_window_ids(win[rows], starts)
        return win

    def _rank_batch(self, first_global: int, sample_ids_of) -> Batch:
        per_rank = self.global_batch // self.world_size
        start = first_global + self.rank * per_rank
        ids = sample_ids_of(np.arange(start, start + per_rank, dtype=np.int64))  # [B/W]
        # One read and one host->device copy for the whole rank share; micro-batches are row slices of it
        # (contiguous views), which keeps per-micro-batch overhead near zero.
        x, y = self._load(ids)  # [B/W, T] each
        return [(x[m : m + self.micro_batch], y[m : m + self.micro_batch])
                for m in range(0, per_rank, self.micro_batch)]

    def next_batch(self) -> Batch:
        """This rank's micro-batches of the next global step; advances the global position by global_batch."""
        batch = self._rank_batch(self._consumed, self.sample_ids)
        self._consumed += self.global_batch
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def eval_batches(self, num_batches: int | None = None) -> Iterator[Batch]:
        """Fixed evaluation batches: samples 0, 1, 2, ... in order, ignoring shuffle and the training position.

        Yields min(num_batches, ceil(n_samples / global_batch)) steps (None: that one full pass), each
        split across ranks exactly like `next_batch`, so the union over ranks is the same for every world
        size. A last partial pass wraps around to sample 0 so that every step keeps its full shape.
        """
        available = -(-self.n_samples // self.global_batch)
        n = available if num_batches is None else min(int(num_batches), available)
        in_order = lambda pos: pos % self.n_samples  # noqa: E731
        for b in range(n):
            yield self._rank_batch(b * self.global_batch, in_order)

    # -- resume -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Global position plus what it is relative to; identical on every rank."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "n_samples": self.n_samples,
            "data_fingerprint": self.data_fingerprint,
            "epoch": self._consumed // self.n_samples,
            "index": self._consumed % self.n_samples,
        }

    def load_state_dict(self, sd: dict[str, Any], strict: bool = True) -> None:
        """Continue from a saved position; any world size, micro-batch and global batch may differ.

        With `strict`, refuses a state whose seed, shuffle, seq_len, split or data differ from this loader's,
        since the saved position would then point into a different sample order.
        """
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r}, expected {STATE_VERSION}")
        if strict:
            mine = self.state_dict()
            bad = [f"{k} {sd.get(k)!r} != {mine[k]!r}"
                   for k in ("split", "seed", "shuffle", "seq_len", "n_samples", "data_fingerprint") if sd.get(k) != mine[k]]
            if bad:
                raise ValueError("loader state does not match this loader: " + "; ".join(bad))
        epoch, slot = int(sd["epoch"]), int(sd["index"])
        if epoch < 0 or not 0 <= slot < self.n_samples:
            raise ValueError(f"loader state position epoch={epoch} index={slot} out of range (n_samples={self.n_samples})")
        self._consumed = epoch * self.n_samples + slot

    def __repr__(self) -> str:
        return (f"ShardedLoader({str(self.data_dir)!r}, split={self.split!r}, seq_len={self.seq_len}, "
                f"global_batch={self.global_batch}, micro_batch={self.micro_batch}, rank={self.rank}/"
                f"{self.world_size}, samples={self.n_samples}, shuffle={self.shuffle}, epoch={self.epoch})")
