"""The decoder-only transformer: embeddings, a stack of `Block`s, the final norm and the LM head.

    x = tok_emb(idx) [+ pos_emb(positions)]; x = dropout(x)
    pre-norm  (GPT-2, Llama):    x = x + attn(norm1(x)); x = x + mlp(norm2(x)); ...; x = norm_f(x)
    post-norm (Vaswani, GPT-1):  x = norm1(x + attn(x)); x = norm2(x + mlp(x)); ...  (no final norm)
    logits = lm_head(x)                       # (B, T, padded_vocab_size)

Parameter names (state-dict keys, no wrapper prefixes):
    tok_emb.weight, pos_emb.weight (learned positions only),
    blocks.{i}.attn_norm.*, blocks.{i}.attn.{wq,wk,wv,wo}.*, blocks.{i}.mlp_norm.*,
    blocks.{i}.mlp.{up,gate,down}.*, norm_f.*, lm_head.weight (also present when tied).

Built for deferred initialisation: `build_model` constructs on the meta device (no memory), materialises
with `to_empty` and calls `init_weights()` once, which initialises every parameter, recomputes the
non-persistent buffers and restores weight tying (`to_empty` unties shared parameters).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist.config import ModelConfig, layer_kinds, moe_layers
from llm_dist.kernels import linear_cross_entropy
from llm_dist.model.attention import AttnMeta, CausalSelfAttention
from llm_dist.model.init import normal_
from llm_dist.model.kv_cache import RollingKVCache
from llm_dist.model.layers import (MLP, NoNorm, RotaryEmbedding, SinusoidalEmbedding, make_embedding, make_linear,
                                   make_norm)
from llm_dist.model.moe import MOE_METRIC_NAMES, MoE, moe_metric_tensor, moe_metrics
from llm_dist.model.scratch import cross_entropy

if TYPE_CHECKING:
    from llm_dist.model.kv_cache import KVCache


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
                       ) -> torch.Tensor:
    """Summed cross-entropy of the logits h @ weight.T (fp32 log-softmax) against targets: `Transformer.lm_loss`
    for loss.impl=torch as a free function of tensors, so it can be compiled apart from the module.

    h: (B, T, C); weight: (V, C); targets: (B, T). Returns a float32 scalar.
    """
    logits = F.linear(h, weight)  # (B, T, V), autocast dtype
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum")


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (GPT-2's 50257 -> 50304 for 64).

    The extra rows of the embedding / columns of the logits are never targets; sampling slices them off.
    """
    return multiple * math.ceil(vocab_size / multiple)


class Block(nn.Module):
    """One transformer layer: attention then MLP, each a residual branch with its norm pre or post.

    Kept as a self-contained module so FSDP and activation checkpointing can wrap one per layer.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp_norm = make_norm(cfg)
        # Hybrid stacks: model.moe decides which layers route over experts (see config.moe_layers).
        self.mlp = MoE(cfg) if moe_layers(cfg)[layer_idx] else MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        meta: AttnMeta | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). meta: the forward's positions/masks (None: 0..T-1, no RoPE)."""
        if self.post_norm:
            x = self.attn_norm(x + self.attn(x, meta, kv_cache))
            return self.mlp_norm(x + self.mlp(x))
        x = x + self.attn(self.attn_norm(x), meta, kv_cache)
        return x + self.mlp(self.mlp_norm(x))

    def init_weights(self, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
        self.attn_norm.init_weights()
        self.attn.init_weights(std, out_std, generator)
        self.mlp_norm.init_weights()
        self.mlp.init_weights(std, out_std, generator)


class Transformer(nn.Module):
    """Decoder-only language model configured by `ModelConfig` (see the module docstring for the layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (> 0); the trainer takes it from the tokenizer")
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.vocab_multiple)
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head

        self.tok_emb = make_embedding(cfg, self.padded_vocab_size, cfg.n_embd)
        self.pos_emb: nn.Module | None = None
        self.rope: RotaryEmbedding | None = None
        self._learned_pos = cfg.pos_emb == "learned"
        if cfg.pos_emb == "learned":
            self.pos_emb = make_embedding(cfg, cfg.block_size, cfg.n_embd)
        elif cfg.pos_emb == "sinusoidal":
            self.pos_emb = SinusoidalEmbedding(cfg.n_embd, cfg.block_size)
        elif cfg.pos_emb == "rope":
            self.rope = RotaryEmbedding(self.head_dim, cfg.block_size, cfg.rope_theta, cfg.rope_scaling)
        elif cfg.pos_emb != "none":
            raise ValueError(f"unknown pos_emb {cfg.pos_emb!r}")
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        # Post-norm blocks already end in a norm; a final norm belongs to the pre-norm layout only.
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else NoNorm()
        self.lm_head = make_linear(cfg, cfg.n_embd, self.padded_vocab_size, bias=False)
        # Every layer windowed and no position table to run out of: positions may grow without bound,
        # and generation keeps only the window (+ sinks) in a RollingKVCache.
        self.streaming = all(k == "local" for k in layer_kinds(cfg)) and cfg.pos_emb in ("rope", "none")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # A scalar per position: the reward model's score (read at the last token) or PPO's value.
        self.score_head = make_linear(cfg, cfg.n_embd, 1) if cfg.score_head else None
        # How the training loss is computed (the `loss` config section; set by build_parallel_model).
        self.loss_impl = "torch"  # torch: callers take logits to F.cross_entropy | fused: forward(idx, targets)
        self.loss_chunk_size = 0  # fused: tokens per chunk, 0 = auto
        self._compiled_head_loss = None  # set by compile_loss (FSDP + train.compile)
        self.init_weights()

    # ---------------------------------------------------------------------------------- initialisation

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation of every parameter, plus the non-persistent buffers.

        Weights of linears and embeddings ~ N(0, init_std^2); the two projections that write into the
        residual stream (attn.wo, mlp.down) ~ N(0, (init_std / sqrt(2 * n_layer))^2) so the residual
        variance stays O(1) after 2*n_layer additions; biases 0; norm weights 1. Safe to call on the
        meta device (a no-op) and after `to_empty` (re-ties the LM head to the token embedding).
        """
        cfg = self.cfg
        if cfg.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight  # to_empty() gives tied parameters separate storage
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layer)
        normal_(self.tok_emb.weight, std, generator)
        if self._learned_pos:
            normal_(self.pos_emb.weight, std, generator)
        elif self.pos_emb is not None:
            self.pos_emb.init_weights()
        if self.rope is not None:
            self.rope.init_weights()
        for block in self.blocks:
            block.init_weights(std, out_std, generator)
        self.norm_f.init_weights()
        if not cfg.tie_embeddings:
            normal_(self.lm_head.weight, std, generator)
        if self.score_head is not None:
            # Drawn last, so every other weight equals that of the same model without the head (a PPO
            # reference built from the same seed is the initial policy). std 1/sqrt(C+1) as InstructGPT's RM.
            normal_(self.score_head.weight, 1.0 / math.sqrt(cfg.n_embd + 1), generator)
            if not self.score_head.bias.is_meta:
                self.score_head.bias.zero_()

    # ----------------------------------------------------------------------------------------- forward

    def positions(
        self, idx: torch.Tensor, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, bool, int]:
        """Absolute positions of the tokens idx (B, T): (positions (Bm, T), padded, host bound on them).

        Bm = 1 when every row shares its positions. `attn_mask` (B, T), 1 = token, 0 = padding (left
        padding of batched prompts): a row's positions count its tokens only, padding gets -1. Padding is
        accepted in a cache's first chunk only; the cache then remembers each row's offset.
        """
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if attn_mask is not None:
            if start:
                raise ValueError("attn_mask (padding) is only accepted for the first chunk of a KV cache")
            m = attn_mask.to(device=idx.device, dtype=torch.bool)
            pos = torch.where(m, m.long().cumsum(dim=1) - 1, -1)  # (B, T)
            if kv_cache is not None:
                kv_cache.offsets = (~m).sum(dim=1)  # (B,) pad tokens per row
            return pos, True, T - 1
        pos = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        if kv_cache is not None and kv_cache.offsets is not None:
            return pos - kv_cache.offsets[:, None], True, start + T - 1  # (B, T) shifted per row
        return pos, False, start + T - 1

    def forward_hidden(
        self, idx: torch.Tensor, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after the final norm and before `lm_head`.

        With a KV cache, the tokens follow the cached ones and their K/V are written to the cache.
        `attn_mask`: see `positions`. A streaming model (every layer windowed, RoPE or no positions) runs
        past block_size; any other model stops there.
        """
        B, T = idx.shape
        pos, padded, max_pos = self.positions(idx, kv_cache, attn_mask)
        if max_pos >= self.cfg.block_size and not self.streaming:
            raise ValueError(f"sequence of {max_pos + 1} tokens exceeds block_size={self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        if padded and self.pos_emb is not None:
            table = self.pos_emb.weight if self._learned_pos else self.pos_emb.table
            x = x + table[pos.clamp(min=0)].to(x.dtype)  # (B, T, C): per-row positions
        elif self._learned_pos:
            x = x + self.pos_emb(pos[0])  # (T, C) broadcast
        elif self.pos_emb is not None:
            x = x + self.pos_emb(max_pos + 1 - T, T).to(x.dtype)
        if self.emb_dropout.p:
            x = self.emb_dropout(x)
        meta = AttnMeta(q_pos=pos, plain=not padded)
        if self.rope is not None:
            if padded or max_pos >= self.cfg.block_size:
                meta.rope = self.rope.at(pos, max_pos)  # (Bm, 1, T, D/2) each
            else:
                meta.rope = self.rope(max_pos + 1 - T, T)  # (T, D/2) each: a slice of the table
        if kv_cache is not None:
            kv_cache.prepare(pos)
            meta.k_pos = kv_cache.k_pos
            meta.plain = not padded and not isinstance(kv_cache, RollingKVCache)  # rolling slots are out of order
        for block in self.blocks:
            x = block(x, meta, kv_cache)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(x)

    def forward(
        self, idx: torch.Tensor, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
        head: str = "lm", targets: torch.Tensor | None = None, ignore_index: int = -100,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) -> logits (B, T, padded_vocab_size). Columns >= vocab_size are padding.

        head="score": the scalar head's output (B, T) in fp32 instead; head="both": (logits, scores).
        Both go through this forward (not a side method) so FSDP's and DDP's hooks see the head's use.
        With `targets` (B, T) (head="lm"): instead the summed cross-entropy over targets != ignore_index
        (float32 scalar, `lm_loss`). It runs here, inside the root module's forward, because that is where
        FSDP has all-gathered `lm_head.weight`, and because a compiled model (`train.compile`) then
        compiles the loss with the forward: the fp32 upcast of the logits fuses into the log-softmax.
        """
        h = self.forward_hidden(idx, kv_cache, attn_mask)  # (B, T, C)
        if head == "lm":
            if targets is None:
                return self.lm_head(h)
            return self.lm_loss(h, targets, ignore_index)
        if self.score_head is None:
            raise ValueError(f"head={head!r} needs a model built with model.score_head=true")
        scores = self.score_head(h).squeeze(-1).float()  # (B, T)
        if head == "score":
            return scores
        if head == "both":
            return self.lm_head(h), scores
        raise ValueError(f"head must be lm | score | both, got {head!r}")

    def lm_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Summed next-token cross-entropy of hidden states h (B, T, C) against targets (B, T), fp32 scalar.

        loss.impl=fused: the chunked linear + cross-entropy (llm_dist/kernels), so the (B*T, V) logits never
        exist at once. loss.impl=torch: the LM head, then cross-entropy on fp32 logits (bf16 logits lose ~3
        significant digits, which shows up directly in the loss). When the model is compiled this runs
        inside the compiled forward, so the upcast is fused into the log-softmax instead of writing a
        (B*T, V) fp32 copy; under FSDP (blocks compiled one by one) `compile_loss` compiles it on its own.
        """
        if self.loss_impl == "fused":
            return linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index, self.loss_chunk_size)
        if self._compiled_head_loss is not None:
            return self._compiled_head_loss(h, self.lm_head.weight, targets, ignore_index)
        logits = self.lm_head(h)  # (B, T, V_padded), autocast dtype
        ce = cross_entropy if self.cfg.ops == "scratch" else F.cross_entropy  # model.ops=scratch: hand-written
        return ce(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index, reduction="sum")

    def compile_loss(self, mode: str = "default") -> None:
        """Compile `lm_loss` (loss.impl=torch, model.ops=torch) on its own: for FSDP, which compiles per block.

        The compiled function takes the (all-gathered) head weight as an argument rather than reading the
        module, so FSDP's swapping of sharded/unsharded parameters cannot trigger recompiles. A model compiled
        as a whole needs no such thing: its forward, loss included, is one graph.
        """
        if self.loss_impl == "torch" and self.cfg.ops == "torch" and isinstance(self.lm_head, nn.Linear) \
                and self.lm_head.bias is None:
            self._compiled_head_loss = torch.compile(head_cross_entropy, mode=mode)

    def extra_metrics(self) -> dict[str, float]:
        """Model-specific training metrics of the latest forward (MoE routing statistics; {} if dense)."""
        return moe_metrics(self)

    def extra_metric_tensor(self) -> tuple[tuple[str, ...], torch.Tensor] | None:
        """`extra_metrics` as (names, device tensor), None if dense: for the trainer's single host sync."""
        vals = moe_metric_tensor(self)
        return None if vals is None else (MOE_METRIC_NAMES, vals)

    # --------------------------------------------------------------------------------------- reporting

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, shared (tied) tensors counted once.

        non_embedding=True excludes the vocabulary and position tables (token embedding, learned
        position embedding and an untied LM head), as in Kaplan et al. (2020) scaling laws.
        Note nanoGPT's "non-embedding" count only drops the position table, so it reads higher.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self._learned_pos:
                n -= self.pos_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def matmul_params(self) -> int:
        """N for the FLOP estimate: every parameter except those only ever *looked up*.

        Excluded: the learned position table and, when untied, the input token-embedding table (its
        forward is a gather, not a matmul). Included: the LM head (a (C x V) matmul per token), so with
        tied embeddings the shared matrix counts once. Biases and norm weights are included too; they
        are O(n_layer * C), well under 0.1% of N for real shapes. MoE layers count their *active*
        parameters: a token runs through top_k of the E experts, so (E - top_k) / E of the expert weights
        do no work for it (the router and a shared expert count in full).
        """
        n = self.num_params()
        if self._learned_pos:
            n -= self.pos_emb.weight.numel()
        if not self.cfg.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        for m in self.modules():
            if isinstance(m, MoE):
                expert = sum(w.numel() for w in (m.w_up, m.w_gate, m.w_down) if w is not None)
                n -= expert * (m.num_experts - m.top_k) // m.num_experts
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) at sequence length T (default block_size):

            6 * N + 12 * L * H * Q * T        (PaLM, Chowdhery et al. 2022, appendix B)

        N = `matmul_params()`; 6N = 2 FLOPs per multiply-add times (1 forward + 2 backward); the second
        term is the attention score and value matmuls (QK^T and PV), which have no parameters. L layers,
        H query heads, Q head dimension. Causal masking is not discounted, matching the paper's MFU.
        """
        T = self.cfg.block_size if seq_len is None else seq_len
        L, H, Q = self.cfg.n_layer, self.cfg.n_head, self.head_dim
        return 6 * self.matmul_params() + 12 * L * H * Q * T


def build_model(cfg: ModelConfig, device: torch.device | str, seed: int | None = None) -> Transformer:
    """Construct on the meta device, materialise on `device` and initialise once.

    With `cfg.lora.rank` > 0 the target linears carry LoRA adapters (B = 0: the base model's outputs) and
    only the adapters require gradients. No memory is spent on a throw-away CPU init. With `seed` the init draws from a private CPU
    generator (the global RNG is left alone; see `llm_dist/model/init.py`), so every rank and every
    device that passes the same seed gets bit-identical weights without broadcasting them.
    """
    from llm_dist.model.lora import apply_lora, init_lora_

    with torch.device("meta"):
        model = Transformer(cfg)
        if cfg.lora.rank:  # model.lora: adapters on the target linears, the rest frozen (llm_dist/model/lora.py)
            apply_lora(model, cfg.lora)
    model.to_empty(device=torch.device(device))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model.init_weights(generator=gen)
    init_lora_(model, gen)
    return model


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def model_summary(model: Transformer, seq_len: int | None = None) -> str:
    """One line for the trainer's start-up print: parameters, non-embedding parameters, FLOPs/token."""
    cfg = model.cfg
    T = cfg.block_size if seq_len is None else seq_len
    return (
        f"model: {cfg.n_layer} layers, {cfg.n_head} heads ({model.n_kv_head} kv), d={cfg.n_embd}, "
        f"vocab {model.vocab_size} (padded {model.padded_vocab_size}) | "
        f"params {_human(model.num_params())} ({model.num_params():,}) | "
        f"non-embedding {_human(model.num_params(non_embedding=True))} | "
        f"FLOPs/token {_human(model.flops_per_token(T))} at T={T} (6N + 12LHQT)"
        + (f" | MoE: {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, in {sum(moe_layers(cfg))} of "
           f"{cfg.n_layer} layers, active params {_human(model.matmul_params())}" if cfg.moe.num_experts else "")
    )
