"""Causal multi-head self-attention with grouped key/value heads (MHA, GQA, MQA) and an optional KV cache.

Two interchangeable implementations, picked by `cfg.attn_impl`:

* `sdpa`   -- `F.scaled_dot_product_attention`, which dispatches to FlashAttention / memory-efficient
              kernels on CUDA and a fused kernel on CPU. Grouped K/V heads go in as they are with
              `enable_gqa=True`, so the repeated K/V are never materialised.
* `manual` -- the reference: explicit QK^T, causal mask, softmax, dropout, @V. Tests hold `sdpa` equal to it.

Query head h reads K/V head h // (n_head / n_kv_head): the `repeat_interleave` grouping that
`enable_gqa` uses and that Llama checkpoints assume.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist.config import ModelConfig
from llm_dist.model.layers import _init_linear, apply_rope, upcast

if TYPE_CHECKING:  # generate.py imports the model; only the type is needed here
    from llm_dist.model.generate import KVCache


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where attention is allowed.

    The queries are the *last* q_len of the k_len positions (bottom-right aligned), which is what a
    KV cache needs: query i sits at absolute position k_len - q_len + i and sees keys 0 .. that position.
    (`is_causal=True` in SDPA is top-left aligned, so it is only right when q_len == k_len.)
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    return k_pos <= q_pos  # (Tq, Tk)


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Reference causal attention. q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D) with H a multiple of Hkv.

    Grouped heads are handled by viewing the H query heads as (Hkv, H/Hkv) rather than copying K/V.
    Scores and softmax run in float32: bf16 logits of a few hundred keys lose enough precision to
    change the argmax of the attention distribution.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qg = q.view(B, Hkv, H // Hkv, Tq, D)  # (B, Hkv, G, Tq, D)
    scores = (upcast(qg) @ upcast(k).unsqueeze(2).transpose(-2, -1)) / math.sqrt(D)  # (B, Hkv, G, Tq, Tk)
    scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    probs = F.dropout(F.softmax(scores, dim=-1), p=dropout_p, training=dropout_p > 0)
    out = probs.type_as(v) @ v.unsqueeze(2)  # (B, Hkv, G, Tq, D)
    return out.reshape(B, H, Tq, D)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention through `F.scaled_dot_product_attention`; shapes as in `manual_attention`."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if Tq == Tk:  # no cached prefix: the plain causal case, which the flash kernels handle natively
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    if Tq == 1:  # one new token after a cached prefix: it may see every key, so no mask at all
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    # A chunk after a cached prefix: needs the bottom-right aligned mask explicitly.
    mask = causal_mask(Tq, Tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


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
        self.impl = cfg.attn_impl
        C, D = cfg.n_embd, self.head_dim
        self.wq = nn.Linear(C, self.n_head * D, bias=cfg.bias)
        self.wk = nn.Linear(C, self.n_kv_head * D, bias=cfg.bias)
        self.wv = nn.Linear(C, self.n_kv_head * D, bias=cfg.bias)
        self.wo = nn.Linear(self.n_head * D, C, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C); rope: (cos, sin) for this chunk's positions, each (T, D/2); returns (B, T, C)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, L+T, D): cached prefix + this chunk
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache allocated in another dtype (e.g. under autocast)
        p = self.dropout if self.training else 0.0
        attend = sdpa_attention if self.impl == "sdpa" else manual_attention
        y = attend(q, k, v, dropout_p=p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.resid_dropout(self.wo(y))

    def init_weights(self, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
        for lin in (self.wq, self.wk, self.wv):
            _init_linear(lin, std, generator)
        _init_linear(self.wo, out_std, generator)  # writes into the residual stream: scaled std
