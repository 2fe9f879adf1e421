"""Causal self-attention: grouped key/value heads (MHA, GQA, MQA), sliding windows, attention sinks, KV caches.

Which keys a query may see is a function of absolute positions only:

    allowed(q, k) = 0 <= k <= q  and  (window == 0  or  q - k < window  or  k < sinks)

`window` is the number of most recent positions a query sees (itself included); `sinks` keeps the first
positions visible to everyone (StreamingLLM, Xiao et al. 2023: the first tokens soak up attention mass,
so dropping them from a sliding window hurts). A position of -1 marks a padding slot (left padding in
batched generation, or an empty cache slot): it is never visible. Layers may differ (`model.attn.pattern`,
e.g. local/global alternation); the positions are shared, so `AttnMeta` builds each distinct mask once.

Implementations (picked by `cfg.attn_impl`):

* `sdpa`   -- `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA, fused on CPU),
              with `is_causal=True` and no mask tensor whenever plain causal attention is what is asked;
              grouped K/V heads go in as they are with `enable_gqa=True`. A sliding window without a cache
              runs `local_attention`, which only computes the (T, 2*window + sinks) band, not (T, T).
* `manual` -- the reference: explicit QK^T, the boolean mask above, softmax, dropout, @V. Tests hold the
              fast paths equal to it.
* `triton` -- the project's FlashAttention kernels (`llm_dist/kernels`) for training-shaped calls: positions
              0..T-1 without padding, full causal or a sliding window, no sinks, no attention dropout, head
              dim 16/32/64/128. Anything else (KV-cache decoding, padded or packed-document masks, sinks,
              dropout > 0, or no GPU / Triton) takes the `sdpa` path, with a one-time warning naming why.

Query head h reads K/V head h // (n_head / n_kv_head): the `repeat_interleave` grouping that
`enable_gqa` uses and that Llama checkpoints assume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist.config import ModelConfig, layer_kinds
from llm_dist.kernels.backend import unsupported_reason, warn_once
from llm_dist.model.layers import _init_linear, apply_rope, make_linear, upcast

if TYPE_CHECKING:  # the caches import nothing from here; only the type is needed
    from llm_dist.model.kv_cache import KVCache, RollingKVCache

SoftmaxFn = Callable[[torch.Tensor, int], torch.Tensor]
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # head dims the FlashAttention kernel is built for (= kernels.flash_attention.HEAD_DIMS)


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where attention is allowed.

    The queries are the *last* q_len of the k_len positions (bottom-right aligned), which is what a
    KV cache needs: query i sits at absolute position k_len - q_len + i and sees keys 0 .. that position.
    (`is_causal=True` in SDPA is top-left aligned, so it is only right when q_len == k_len.)
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos  # (Tq, Tk)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0, sinks: int = 0) -> torch.Tensor:
    """Boolean mask (Bm, 1, Tq, Tk), True where allowed, from absolute positions q_pos (Bm, Tq), k_pos (Bm, Tk).

    Bm is the batch or 1 (positions shared by every row). Position -1 = padding / empty slot.
    """
    q = q_pos[:, None, :, None]  # (Bm, 1, Tq, 1)
    k = k_pos[:, None, None, :]  # (Bm, 1, 1, Tk)
    allowed = (k >= 0) & (k <= q)
    if window:
        allowed &= (q - k < window) | (k < sinks)
    # A padding query sees no key at all; its softmax would be 0/0 = NaN, and NaN values poison real
    # queries through 0 * NaN in P @ V at the next layer. Let such rows see everything: finite, ignored.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


@dataclass
class AttnMeta:
    """Positions of one forward pass, shared by every layer; builds each (window, sinks) mask once.

    q_pos: (Bm, T) positions of this chunk's tokens; k_pos: (Bm, Tk) positions of the keys attention sees
    (the cache's slots then this chunk; `None` = the keys are this chunk). `plain` means no padding and
    the keys are exactly positions 0..Tk-1 in order, so full causal attention needs no mask tensor.
    rope: (cos, sin) for q_pos, each (T, D/2) or (Bm, 1, T, D/2); None without RoPE.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor | None = None
    plain: bool = True
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    _masks: dict = field(default_factory=dict)

    def mask(self, window: int, sinks: int) -> torch.Tensor | None:
        """The boolean mask for a layer with this window/sinks, or None when plain causal attention is exact."""
        k_pos = self.q_pos if self.k_pos is None else self.k_pos
        if self.plain and (window == 0 or window >= k_pos.shape[-1]):
            return None
        key = (window, sinks)
        if key not in self._masks:
            self._masks[key] = attention_mask(self.q_pos, k_pos, window, sinks)
        return self._masks[key]


def manual_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
    softmax: SoftmaxFn | None = None,
) -> torch.Tensor:
    """Reference attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv.

    mask: boolean, broadcastable to (B, 1, Tq, Tk), True = allowed; None = bottom-right causal.
    Grouped heads are handled by viewing the H query heads as (Hkv, H/Hkv) rather than copying K/V.
    Scores and softmax run in float32: bf16 logits of a few hundred keys lose enough precision to
    change the argmax of the attention distribution. `softmax(x, dim)` defaults to `F.softmax`
    (`model.ops=scratch` passes the hand-written one).
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qg = q.view(B, Hkv, H // Hkv, Tq, D)  # (B, Hkv, G, Tq, D)
    scores = (upcast(qg) @ upcast(k).unsqueeze(2).transpose(-2, -1)) / math.sqrt(D)  # (B, Hkv, G, Tq, Tk)
    if mask is None:
        mask = causal_mask(Tq, Tk, q.device)  # (Tq, Tk)
    else:
        mask = mask.unsqueeze(2)  # (Bm, 1, 1, Tq, Tk): broadcast over kv heads and groups
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = (softmax or F.softmax)(scores, -1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    out = probs.type_as(v) @ v.unsqueeze(2)  # (B, Hkv, G, Tq, D)
    return out.reshape(B, H, Tq, D)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention through `F.scaled_dot_product_attention`; shapes and `mask` as in `manual_attention`."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    if Tq == Tk:  # no cached prefix: the plain causal case, which the flash kernels handle natively
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if Tq == 1:  # one new token after a cached prefix: it may see every key, so no mask at all
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    # A chunk after a cached prefix: needs the bottom-right aligned mask explicitly.
    mask = causal_mask(Tq, Tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int = 0, dropout_p: float = 0.0
) -> torch.Tensor:
    """Sliding-window (+ sinks) causal attention over positions 0..T-1 in O(T * (2W + S)) instead of O(T^2).

    q: (B, H, T, D); k, v: (B, Hkv, T, D). The queries are cut into chunks of W = window; the keys a
    chunk can see lie in that chunk and the one before it (2W keys), plus the S sink keys, which are
    shared by every chunk. Each chunk then is one small masked SDPA, all chunks in one batched call.
    A sink key that also lies inside the two-chunk band is masked in the sink copy, so it counts once.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    W, S = window, min(sinks, T)
    n = math.ceil(T / W)
    pad = n * W - T
    qc = F.pad(q, (0, 0, 0, pad)).view(B, H, n, W, D).transpose(1, 2)  # (B, n, H, W, D)

    def band(x: torch.Tensor) -> torch.Tensor:  # (B, Hkv, T, D) -> (B, n, Hkv, 2W, D): previous + own chunk
        xp = F.pad(x, (0, 0, W, pad))  # (B, Hkv, W + nW, D): one chunk of zeros in front
        return xp.unfold(2, 2 * W, W).permute(0, 2, 1, 4, 3)  # unfold -> (B, Hkv, n, D, 2W)

    kc, vc = band(k), band(v)
    dev = q.device
    q_pos = torch.arange(n * W, device=dev).view(n, W)  # (n, W)
    k_pos = (torch.arange(n, device=dev) * W - W)[:, None] + torch.arange(2 * W, device=dev)  # (n, 2W)
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = (kp >= 0) & (kp <= qp) & (qp - kp < W)  # (n, W, 2W)
    if S:
        s_pos = torch.arange(S, device=dev)[None, None, :]  # (1, 1, S)
        in_band = s_pos >= k_pos[:, :1, None]  # (n, 1, S): the sink is also one of this chunk's band keys
        sink_mask = (s_pos <= qp) & ~((qp - s_pos < W) & in_band)  # (n, W, S)
        mask = torch.cat([sink_mask, mask], dim=-1)  # (n, W, S + 2W)
        ks = k[:, :, :S].unsqueeze(1).expand(B, n, Hkv, S, D)
        vs = v[:, :, :S].unsqueeze(1).expand(B, n, Hkv, S, D)
        kc, vc = torch.cat([ks, kc], dim=3), torch.cat([vs, vc], dim=3)  # (B, n, Hkv, S + 2W, D)
    mask = mask | ~mask.any(-1, keepdim=True)  # padded query rows past T: finite garbage, sliced off below
    Bn = B * n
    y = F.scaled_dot_product_attention(
        qc.reshape(Bn, H, W, D), kc.reshape(Bn, Hkv, -1, D), vc.reshape(Bn, Hkv, -1, D),
        attn_mask=mask.unsqueeze(1).repeat(B, 1, 1, 1), dropout_p=dropout_p, enable_gqa=H != Hkv,
    )  # (B*n, H, W, D)
    return y.view(B, n, H, W, D).transpose(1, 2).reshape(B, H, n * W, D)[:, :, :T]


class CausalSelfAttention(nn.Module):
    """Projections, RoPE, KV cache and the attention kernel for one block.

    Separate q/k/v projections (rather than one fused qkv matrix) because with GQA they have different
    widths, and so that tensor parallelism can later shard each one column-wise on its own.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.scratch = cfg.ops == "scratch"
        # The hand-written ops have no fused kernel: the scratch model always takes the reference path.
        self.impl = "manual" if self.scratch else cfg.attn_impl
        local = layer_kinds(cfg)[layer_idx] == "local"
        self.window = cfg.attn.window if local else 0
        self.sinks = cfg.attn.sinks if local else 0
        C, D = cfg.n_embd, self.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias  # Qwen2: biases on q/k/v only, none on wo
        self.wq = make_linear(cfg, C, self.n_head * D, bias=qkv_bias)
        self.wk = make_linear(cfg, C, self.n_kv_head * D, bias=qkv_bias)
        self.wv = make_linear(cfg, C, self.n_kv_head * D, bias=qkv_bias)
        self.wo = make_linear(cfg, self.n_head * D, C, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        meta: AttnMeta | None = None,
        kv_cache: KVCache | RollingKVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C); meta: this forward's positions (None = positions 0..T-1, no RoPE); returns (B, T, C)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if meta is None:
            meta = AttnMeta(q_pos=torch.arange(T, device=x.device)[None])
        if meta.rope is not None:
            q, k = apply_rope(q, *meta.rope), apply_rope(k, *meta.rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, Tk, D): cached keys + this chunk
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache allocated in another dtype (e.g. under autocast)
        p = self.dropout if self.training else 0.0
        mask = meta.mask(self.window, self.sinks)
        if self.impl == "manual":
            softmax = None
            if self.scratch:
                from llm_dist.model.scratch import softmax  # local: scratch imports layers, not attention
            y = manual_attention(q, k, v, dropout_p=p, mask=mask, softmax=softmax)
        elif self.impl == "triton" and self._triton_usable(q, kv_cache, meta, p):
            from llm_dist.kernels.flash_attention import flash_attention_triton  # imports triton: only when used

            y = flash_attention_triton(q, k, v, causal=True, window=self.window)  # (B, H, T, D)
        elif mask is not None and kv_cache is None and meta.plain and T >= 4 * self.window:
            y = local_attention(q, k, v, self.window, self.sinks, dropout_p=p)  # the banded fast path
        else:
            y = sdpa_attention(q, k, v, dropout_p=p, mask=mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        y = self.wo(y)
        # Skipping the no-op module call (dropout 0) is measurable in one-token decode steps of small models.
        return self.resid_dropout(y) if self.dropout else y

    def _triton_usable(self, q: torch.Tensor, kv_cache: object, meta: AttnMeta, dropout_p: float) -> bool:
        """Whether this call fits the FlashAttention kernel; if not, warn once (per reason) and say False."""
        reason = None
        if kv_cache is not None:
            reason = "KV-cache decoding"
        elif not meta.plain:
            reason = "padded or packed-document attention masks"
        elif self.sinks:
            reason = "attention sinks (model.attn.sinks)"
        elif dropout_p:
            reason = "attention dropout (model.dropout > 0)"
        elif self.head_dim not in TRITON_HEAD_DIMS:
            reason = f"head dim {self.head_dim} (the kernel takes {', '.join(map(str, TRITON_HEAD_DIMS))})"
        else:
            reason = unsupported_reason(q)
        if reason is None:
            return True
        warn_once(f"attn_impl=triton:{reason}", f"model.attn_impl=triton: using SDPA for {reason}")
        return False

    def init_weights(self, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
        for lin in (self.wq, self.wk, self.wv):
            _init_linear(lin, std, generator)
        _init_linear(self.wo, out_std, generator)  # writes into the residual stream: scaled std
