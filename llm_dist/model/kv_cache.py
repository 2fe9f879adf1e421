"""KV caches for generation: a pre-allocated full cache, and a rolling buffer for sliding-window models.

Both hold k, v: (n_layer, batch, n_kv_head, n_slots, head_dim) allocated once, and `slot_pos`
(batch, n_slots): the absolute position of the token in each slot, -1 for an empty slot or a padding
token (attention never sees those). Only the n_kv_head grouped heads are stored (not the n_head
repeated ones), so GQA/MQA shrink the cache by n_head / n_kv_head.

Protocol with the model, once per forward of T tokens:
    cache.prepare(positions)   # (Bm, T) positions of the chunk; fixes the slots it goes to and `k_pos`
    k, v = cache.update(layer, k, v)   # in every layer: store this chunk, return the keys to attend to
    cache.advance(T)           # after the last layer

`KVCache` keeps every position in order (slot = token index), so up to `max_len` tokens.
`RollingKVCache` keeps only what a sliding window of W with S sinks can still see: the S sink positions
plus the last W, in S + W slots; position p >= S lives in slot S + (p - S) mod W and overwrites the
position W before it, which no later query can see. Memory is constant however long generation runs.
Because keys carry their absolute-position RoPE rotation from when they were written, slot order does
not matter: the mask is built from `slot_pos`, not from slot indices.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for tokens 0 .. length-1 (prompt padding included), in order."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.slot_pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0  # tokens fed so far (slots used), padding included
        self.offsets: torch.Tensor | None = None  # (B,) left-padding tokens per row; position = index - offset
        self.k_pos: torch.Tensor | None = None  # (B, Tk) positions of the keys of the current forward
        self._end = 0

    @classmethod
    def for_model(
        cls,
        model,  # noqa: ANN001 - a Transformer (not imported: the model imports this module)
        batch: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "KVCache":
        """A cache shaped for `model` (max_len defaults to block_size; device/dtype to the model's)."""
        w = model.tok_emb.weight
        return cls(
            model.cfg.n_layer, batch, model.n_kv_head, max_len or model.cfg.block_size, model.head_dim,
            device=device if device is not None else w.device, dtype=dtype or w.dtype,
        )

    @property
    def pos(self) -> int:
        """Tokens fed so far: the slot (and, without padding, the position) of the next token."""
        return self.length

    @property
    def padded(self) -> bool:
        """Whether some row began with left padding (then positions differ between rows)."""
        return self.offsets is not None

    def prepare(self, positions: torch.Tensor) -> None:
        """Reserve slots length .. length+T-1 for a chunk with positions (Bm, T); sets `k_pos`."""
        T = positions.shape[-1]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.slot_pos[:, self.length : end] = positions
        self.k_pos = self.slot_pos[:, :end]
        self._end = end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this chunk's k, v (B, Hkv, T, D) at the cursor; return all keys/values so far (B, Hkv, L+T, D)."""
        B, T = k.shape[0], k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer, :B, :, self.length : end] = k
        self.v[layer, :B, :, self.length : end] = v
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]

    def advance(self, n: int) -> None:
        """Move the cursor past the n tokens every layer has just written."""
        self.length += n

    def reset(self) -> None:
        """Forget the cached tokens (the buffers are reused, not freed)."""
        self.length = 0
        self.offsets = None
        self.slot_pos.fill_(-1)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B,) of the batch, in that order (beam search: follow each beam's parent)."""
        self.k.copy_(self.k.index_select(1, index))
        self.v.copy_(self.v.index_select(1, index))
        self.slot_pos.copy_(self.slot_pos.index_select(0, index))
        if self.offsets is not None:
            self.offsets = self.offsets.index_select(0, index)

    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.slot_pos))


class RollingKVCache(KVCache):
    """Constant-memory cache for models whose layers all use a sliding window (+ sinks): S + W slots.

    One extra "trash" slot at the end receives the writes nothing will read (padding tokens, and tokens
    of a long prefill chunk that a later token of the same chunk already displaces), so every write is
    one scatter with no data-dependent shapes.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        window: int,
        sinks: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if window <= 0:
            raise ValueError(f"RollingKVCache needs a sliding window > 0, got window={window}")
        self.window, self.sinks = window, sinks
        self.n_slots = sinks + window
        super().__init__(n_layer, batch, n_kv_head, self.n_slots + 1, head_dim, device, dtype)
        self.max_len = 2**62  # positions are unbounded; only n_slots are ever held
        self._slot: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int | None = None,  # noqa: ANN001
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RollingKVCache":
        """A rolling cache for a streaming `model` (every layer local); `max_len` is ignored."""
        w = model.tok_emb.weight
        a = model.cfg.attn
        return cls(model.cfg.n_layer, batch, model.n_kv_head, a.window, a.sinks, model.head_dim,
                   device=device if device is not None else w.device, dtype=dtype or w.dtype)

    def prepare(self, positions: torch.Tensor) -> None:
        B = self.slot_pos.shape[0]
        pos = positions.expand(B, -1)  # (B, T)
        n, S, W = self.n_slots, self.sinks, self.window
        old = self.slot_pos[:, :n]  # (B, n): what the chunk's queries may see from before it
        self.k_pos = torch.cat([old, pos], dim=1)  # (B, n + T): the keys are [buffer, this chunk]
        last = pos.amax(dim=1, keepdim=True)  # (B, 1)
        keep = (pos >= 0) & ((pos < S) | (pos > last - W))  # survives the chunk: a sink or one of the last W
        slot = torch.where(pos < S, pos, S + (pos - S) % W)
        self._slot = torch.where(keep, slot, torch.full_like(slot, n))  # (B, T); n = the trash slot
        self.slot_pos.scatter_(1, self._slot, pos)
        self.slot_pos[:, n] = -1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over [the buffer as it was, this chunk]; then write the chunk's survivors into their slots."""
        B, Hkv, T, D = k.shape
        n = self.n_slots
        k_all = torch.cat([self.k[layer, :B, :, :n], k], dim=2)  # (B, Hkv, n + T, D): a copy, safe to overwrite
        v_all = torch.cat([self.v[layer, :B, :, :n], v], dim=2)
        idx = self._slot[:B, None, :, None].expand(B, Hkv, T, D)
        self.k[layer, :B].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer, :B].scatter_(2, idx, v.to(self.v.dtype))
        return k_all, v_all
