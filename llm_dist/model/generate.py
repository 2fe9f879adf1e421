"""Autoregressive generation: a pre-allocated KV cache, the sampling step and the decoding loop.

With the cache, the prompt is run once (prefill) and every later step feeds only the newest token,
whose keys/values are appended to the cache: O(T) work per token instead of O(T^2). Positions are
absolute (0 .. block_size-1), so once the sequence would outgrow `block_size` the cache cannot take
another token; from there generation falls back to a sliding window: the last `block_size` tokens are
recomputed from scratch each step, exactly as `use_cache=False` does all along. Both modes therefore
see the same contexts and produce the same tokens (up to float rounding of the logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm_dist.model.layers import upcast
from llm_dist.model.transformer import Transformer


class KVCache:
    """Keys and values of every layer for positions 0 .. length-1, in buffers allocated once.

    k, v: (n_layer, batch, n_kv_head, max_len, head_dim). Only the n_kv_head grouped heads are stored
    (not the n_head repeated ones), so GQA/MQA shrink the cache by n_head / n_kv_head.
    Each attention layer `update`s its slice at the cursor; the model `advance`s the cursor once per
    forward, after all layers have written the same positions.
    """

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
        self.max_len = max_len
        self.length = 0  # positions filled so far == absolute position of the next token

    @classmethod
    def for_model(
        cls,
        model: Transformer,
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
        """Alias of `length`: the position the next token will take."""
        return self.length

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
        """Move the cursor past the n positions every layer has just written."""
        self.length += n

    def reset(self) -> None:
        """Forget the cached positions (the buffers are reused, not freed)."""
        self.length = 0


# ------------------------------------------------------------------------------------------- sampling


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k and then outside the top-p nucleus to -inf. logits: (B, V).

    top_k: keep the k largest (ties with the k-th are kept too); 0 = off.
    top_p: keep the smallest set of most likely tokens whose probability (after top-k) reaches top_p,
    i.e. a token survives if the mass of the strictly more likely ones is below top_p; 1.0 = off.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = F.softmax(upcast(sorted_logits), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # (B, V): mass of the strictly better tokens
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and always survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample_next` draws from (temperature > 0): softmax(filter(logits / T)), (B, V), at least float32."""
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0 (use sample_next for greedy), got {temperature}")
    # float32: bf16 logits / a small temperature would flatten or overflow the softmax.
    return F.softmax(filter_logits(upcast(logits) / temperature, top_k, top_p), dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token for each row of logits (B, V) -> (B,) int64. temperature == 0 is greedy (argmax;
    top_k/top_p do not matter then). `generator` must live on the logits' device."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------- generation


def _cache_dtype(model: Transformer, device: torch.device) -> torch.dtype:
    """Cache K/V in the dtype attention will compute in: autocast's if active, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.tok_emb.weight.dtype


def generate(
    model: Transformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend prompts idx (B, T0) by up to `max_new_tokens` tokens; returns (B, T0 + n) int64, n <= max_new_tokens.

    Sampling as in `sample_next` (greedy at temperature 0), only over the true vocabulary (the padded
    logit columns are sliced off). With `eos_id`, a sequence that has emitted it keeps emitting it
    (as padding) and the loop stops once every sequence has. Prompts longer than block_size are cropped
    to their last block_size tokens. `use_cache=True`: prefill, then one token per step through a
    KVCache, then the sliding-window recomputation once the context fills block_size (see the module
    docstring). `use_cache=False`: full recomputation over the last block_size tokens every step.

    Pass the bare `Transformer` (not a DDP/compiled wrapper). It runs in eval mode (dropout off) under
    `torch.inference_mode()`, and its previous train/eval mode is restored afterwards. The result is
    an ordinary tensor (cloned out of inference mode), so RL code can feed rollouts back into a
    forward pass that records gradients.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T0) with T0 >= 1, got {tuple(idx.shape)}")
    with torch.inference_mode():
        out = _decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator)
    return out.clone()


def _decode(
    model: Transformer,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The decoding loop of `generate` (called under inference mode)."""
    block_size, V = model.cfg.block_size, model.vocab_size
    was_training = model.training
    model.eval()
    try:
        out = idx
        B = idx.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = None
        context = idx[:, -block_size:]  # (B, T)
        if use_cache and max_new_tokens > 0:
            max_len = min(block_size, context.shape[1] + max_new_tokens)
            cache = KVCache.for_model(model, B, max_len, device=idx.device, dtype=_cache_dtype(model, idx.device))
        logits = model(context, kv_cache=cache)[:, -1, :V] if max_new_tokens > 0 else None  # (B, V)
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)  # (B, T0 + step + 1)
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            if cache is not None and cache.length < cache.max_len:
                logits = model(nxt[:, None], kv_cache=cache)[:, -1, :V]  # the new token at position cache.length
            else:
                cache = None  # full: slide the window and recompute, like use_cache=False
                logits = model(out[:, -block_size:])[:, -1, :V]
        return out
    finally:
        model.train(was_training)
