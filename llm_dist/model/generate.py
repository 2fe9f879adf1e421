"""Autoregressive generation: the sampling step and the batched decoding loop (beam search: beam.py).

With a KV cache (kv_cache.py) the prompt is run once (prefill) and every later step feeds only the
newest token, whose keys/values are appended to the cache: O(T) work per token instead of O(T^2).

How far generation can go depends on the model:
* a *streaming* model (every layer a sliding window, RoPE or no positions) decodes through a
  `RollingKVCache` of window + sinks slots for as long as asked, in constant memory; `use_cache=False`
  recomputes the whole sequence every step, which gives the same tokens.
* any other model has absolute positions 0 .. block_size-1, so once the sequence would outgrow
  `block_size` the cache cannot take another token; from there generation falls back to a sliding
  context: the last `block_size` tokens are recomputed from scratch each step, exactly as
  `use_cache=False` does all along. Both modes see the same contexts and produce the same tokens
  (up to float rounding of the logits).

Batches of prompts of different lengths are left-padded with an `attention_mask` (1 = token, 0 = pad):
each row's positions count its own tokens only and padding is never attended to, so a padded row
generates what it would alone. Each row stops at its own `eos_id`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llm_dist.model.kv_cache import KVCache, RollingKVCache
from llm_dist.model.layers import upcast
from llm_dist.model.transformer import Transformer

__all__ = ["KVCache", "RollingKVCache", "apply_repetition_penalty", "filter_logits", "generate", "make_cache",
           "sample_next", "sampling_probs"]


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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): for tokens already in the sequence, divide a
    positive logit by `penalty` and multiply a negative one by it (both make the token less likely for
    penalty > 1). logits: (B, V); seen: (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _cache_dtype(model: Transformer, device: torch.device) -> torch.dtype:
    """Cache K/V in the dtype attention will compute in: autocast's if active, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.tok_emb.weight.dtype


def make_cache(model: Transformer, batch: int, max_len: int, device: torch.device) -> KVCache:
    """A rolling cache for a streaming model, else a full cache of `max_len` slots."""
    dtype = _cache_dtype(model, device)
    if model.streaming:
        return RollingKVCache.for_model(model, batch, device=device, dtype=dtype)
    return KVCache.for_model(model, batch, max_len, device=device, dtype=dtype)


def check_left_padding(attention_mask: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """Validate a (B, T0) left-padding mask; returns it as bool, or None when it pads nothing."""
    if attention_mask is None:
        return None
    m = attention_mask.to(device=idx.device, dtype=torch.bool)
    if m.shape != idx.shape:
        raise ValueError(f"attention_mask shape {tuple(m.shape)} != idx shape {tuple(idx.shape)}")
    if not bool(m[:, -1].all()) or not bool((m[:, 1:] >= m[:, :-1]).all()):
        raise ValueError("attention_mask must be left padding: zeros, then ones, with every row's last token real")
    return None if bool(m.all()) else m


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
    *,
    attention_mask: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Extend prompts idx (B, T0) by up to `max_new_tokens` tokens; returns (B, T0 + n) int64, n <= max_new_tokens.

    Sampling as in `sample_next` (greedy at temperature 0) after the repetition penalty, only over the
    true vocabulary (the padded logit columns are sliced off). `attention_mask` (B, T0): left padding of
    prompts of different lengths (see the module docstring). With `eos_id`, a sequence that has emitted
    it keeps emitting it (as padding) and the loop stops once every sequence has. Prompts longer than
    the context are cropped to their last block_size tokens (not for streaming models). `seed` makes a
    private generator (when `generator` is not given), so the same call gives the same tokens.

    Pass the bare `Transformer` (not a DDP/compiled wrapper). It runs in eval mode (dropout off) under
    `torch.inference_mode()` (`no_grad` under FSDP: `decoding_mode`), and its previous train/eval mode is restored afterwards. The result is
    an ordinary tensor (cloned out of inference mode), so RL code can feed rollouts back into a
    forward pass that records gradients.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T0) with T0 >= 1, got {tuple(idx.shape)}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    mask = check_left_padding(attention_mask, idx)
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    with decoding_mode(model):
        out = _decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, mask,
                      repetition_penalty)
    return out.clone()


def decoding_mode(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """`torch.inference_mode()`, or `torch.no_grad()` for an FSDP-sharded model: FSDP2 reuses its unsharded
    parameter buffers across forwards, and buffers first allocated in inference mode cannot be written by
    the all-gathers of a later training forward ("Inplace update to inference tensor")."""
    from torch.distributed.fsdp import FSDPModule

    return torch.no_grad() if isinstance(model, FSDPModule) else torch.inference_mode()


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
    mask: torch.Tensor | None,
    penalty: float,
) -> torch.Tensor:
    """The decoding loop of `generate` (called under inference mode)."""
    block_size, V = model.cfg.block_size, model.vocab_size
    limit = None if model.streaming else block_size  # how much context one forward may take

    def window(seq: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if limit is None:
            return seq, m
        return seq[:, -limit:], (m[:, -limit:] if m is not None else None)

    was_training = model.training
    model.eval()
    try:
        out = idx
        B = idx.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        seen = None
        if penalty != 1.0:  # which tokens each row holds (padding excluded): (B, V)
            seen = torch.zeros(B, model.padded_vocab_size, dtype=torch.bool, device=idx.device)
            seen.scatter_(1, idx, mask if mask is not None else torch.ones_like(idx, dtype=torch.bool))
            seen = seen[:, :V]
        if max_new_tokens <= 0:
            return out
        context, cmask = window(idx, mask)
        cache = None
        if use_cache:
            cache = make_cache(model, B, min(block_size, context.shape[1] + max_new_tokens), idx.device)
        logits = model(context, kv_cache=cache, attn_mask=cmask)[:, -1, :V]  # (B, V)
        for step in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, penalty)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)  # (B, T0 + step + 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if seen is not None:
                seen[torch.arange(B, device=idx.device), nxt] = True
            if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                break
            if cache is not None and cache.length < cache.max_len:
                logits = model(nxt[:, None], kv_cache=cache)[:, -1, :V]  # the new token after the cached ones
            else:
                cache = None  # full: slide the window and recompute, like use_cache=False
                context, cmask = window(out, mask)
                logits = model(context, attn_mask=cmask)[:, -1, :V]
        return out
    finally:
        model.train(was_training)
