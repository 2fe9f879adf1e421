"""Building blocks of the transformer that are not attention: norms, the MLP and positional encodings.

Every module here owns an `init_weights(...)` that (re)initialises all of its parameters in place, so
a model built on the meta device and materialised with `to_empty` can be initialised exactly once.
Tables that are functions of the config alone (RoPE cos/sin, the sinusoidal position table) are
non-persistent buffers: they never enter a checkpoint and `init_weights` recomputes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist.config import ModelConfig, RopeScalingConfig
from llm_dist.kernels.backend import unsupported_reason, warn_once
from llm_dist.model import scratch
from llm_dist.model.init import normal_



def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (half precisions are widened; float64 is left alone for reference tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def make_linear(cfg: ModelConfig, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """`nn.Linear`, or its hand-written twin under `model.ops=scratch` (same parameter names and shapes)."""
    if cfg.ops == "scratch":
        return scratch.Linear(in_features, out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


def make_embedding(cfg: ModelConfig, num: int, dim: int) -> nn.Module:
    """`nn.Embedding`, or its hand-written twin under `model.ops=scratch` (same `weight`)."""
    if cfg.ops == "scratch":
        return scratch.Embedding(num, dim)
    return nn.Embedding(num, dim)


# ------------------------------------------------------------------------------------------------ norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, no centring, no bias.

    The statistic is computed in float32 even for bf16/fp16 inputs: mean(x^2) over a few thousand
    channels overflows fp16 and loses most of its mantissa in bf16. `impl="triton"` (model.norm_impl) runs
    the same arithmetic as one fused kernel (llm_dist/kernels/rmsnorm.py) where Triton can run, and this
    code, after a one-time warning, where it cannot.
    """

    def __init__(self, dim: int, eps: float = 1e-5, impl: str = "torch"):
        super().__init__()
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(dim))
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "triton":
            reason = unsupported_reason(x)
            if reason is None:
                from llm_dist.kernels.rmsnorm import rms_norm_triton  # imports triton: only when used

                return rms_norm_triton(x, self.weight, self.eps)
            warn_once("norm_impl=triton", f"model.norm_impl=triton: using the PyTorch RMSNorm ({reason})")
        xf = upcast(x)  # (..., C)
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * upcast(self.weight)).type_as(x)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` with optional bias and the same `init_weights()` hook as the other modules."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)

    def init_weights(self) -> None:
        self.reset_parameters()  # weight = 1, bias = 0


class NoNorm(nn.Identity):
    """`norm=none`: an identity with the common `init_weights()` hook (nothing to initialise)."""

    def init_weights(self) -> None:
        pass


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm chosen by `cfg.norm` over the residual width."""
    if cfg.norm == "layernorm":
        return LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps, impl=cfg.norm_impl)
    if cfg.norm == "none":
        return NoNorm()
    raise ValueError(f"unknown norm {cfg.norm!r}")


# -------------------------------------------------------------------------------------------------- MLP


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """Inner MLP width: `cfg.mlp_hidden` if set, else 4*C (GELU) or 8/3*C rounded up to `mlp_multiple`
    (SwiGLU; Llama's rule, which keeps its three matrices at about the parameter count of a 4*C GELU MLP)."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.mlp == "gelu":
        return 4 * cfg.n_embd
    hidden = int(8 * cfg.n_embd / 3)
    return cfg.mlp_multiple * math.ceil(hidden / cfg.mlp_multiple)


class MLP(nn.Module):
    """Position-wise feed-forward network.

    gelu:   down(gelu_tanh(up(x)))          (GPT-2; the tanh approximation matches its checkpoints)
    swiglu: down(silu(gate(x)) * up(x))     (Shazeer 2020; Llama)

    `down` writes into the residual stream, so it is initialised with the scaled residual std.
    """

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or mlp_hidden_size(cfg)
        self.kind = cfg.mlp
        self.up = make_linear(cfg, cfg.n_embd, hidden, bias=cfg.bias)
        self.gate = make_linear(cfg, cfg.n_embd, hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.down = make_linear(cfg, hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, hidden)
        else:
            h = F.gelu(self.up(x), approximate="tanh")  # (B, T, hidden)
        y = self.down(h)  # (B, T, C)
        return self.dropout(y) if self.dropout.p else y  # no module call for dropout 0 (decode overhead)

    def init_weights(self, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
        for lin in (self.up, self.gate):
            if lin is not None:
                _init_linear(lin, std, generator)
        _init_linear(self.down, out_std, generator)


def _init_linear(lin: nn.Module, std: float, generator: torch.Generator | None) -> None:
    """GPT-2 init for one linear layer: weight ~ N(0, std^2), bias = 0."""
    normal_(lin.weight, std, generator)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


# -------------------------------------------------------------------------------- positional encodings


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) positions, (n_pos, dim) float32:
    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim)).

    Computed in float64: p * inv_freq reaches ~block_size radians, where float32 keeps only ~4 digits
    of the fractional part that sin/cos depend on.
    """
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]  # (P, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(dim/2),)
    angles = pos * inv_freq  # (P, ceil(dim/2))
    table = torch.empty(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])  # odd dim: the last sin column has no cos partner
    return table.float()


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None) -> torch.Tensor:
    """RoPE's per-pair angular frequencies theta^(-2i/d), (head_dim/2,) float64, after `scaling` if any.

    linear: every frequency / factor (positions interpolated). llama3 (Llama 3.1's long-context rule, as
    transformers' `_compute_llama3_parameters`): with L = original_max_position_embeddings, wavelengths
    2*pi/f longer than L/low_freq_factor are divided by factor, shorter than L/high_freq_factor are kept,
    and the band between blends the two with s = (L/wavelength - low) / (high - low):
    f' = (1 - s) * f / factor + s * f. The attention scale stays 1 for both (as in transformers).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    kind = scaling.type if scaling is not None else "none"
    if kind == "none":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling.factor
    if kind != "llama3":
        raise ValueError(f"unknown rope scaling {kind!r}")
    L, lo, hi, factor = (scaling.original_max_position_embeddings, scaling.low_freq_factor,
                         scaling.high_freq_factor, scaling.factor)
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    scaled = torch.where(wavelen > L / lo, inv_freq / factor, inv_freq)  # low frequencies: interpolated
    smooth = (L / wavelen - lo) / (hi - lo)
    medium = (wavelen >= L / hi) & (wavelen <= L / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_tables(n_pos: int, head_dim: int, theta: float, scaling: RopeScalingConfig | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al. 2021) rotation tables, each (n_pos, head_dim/2) float32: cos and sin of p * inv_freq[i]
    (`rope_inv_freq`: theta^(-2i/d), optionally scaled).

    float64 for the same reason as `sinusoidal_table`: the angle p * inv_freq is large for big p.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (D/2,)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq  # (P, D/2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of every head by angle p * inv_freq[i].

    x: (B, H, T, D); cos, sin: (T, D/2), or (B, 1, T, D/2) for per-row positions. This is the complex product (x[2i] + i x[2i+1]) * e^{i p w_i}
    of the original RoPE / Llama, written out in reals so it runs in any dtype and compiles cleanly.
    The rotation is done in float32 so bf16 activations do not lose the (small) position signal.
    """
    xf = upcast(x).unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, H, T, D/2) each
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, H, T, D/2, 2)
    return out.flatten(-2).type_as(x)  # (B, H, T, D)


class RotaryEmbedding(nn.Module):
    """Holds the RoPE cos/sin tables for positions 0..block_size-1 as non-persistent float32 buffers."""

    def __init__(self, head_dim: int, block_size: int, theta: float, scaling: RopeScalingConfig | None = None):
        super().__init__()
        self.head_dim, self.block_size, self.theta, self.scaling = head_dim, block_size, theta, scaling
        self.register_buffer("cos", torch.empty(block_size, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(block_size, head_dim // 2), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        # Computed on the CPU and copied in place: works on meta (a no-op), keeps the buffer objects.
        cos, sin = rope_tables(self.block_size, self.head_dim, self.theta, self.scaling)
        with torch.no_grad():
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start .. start+length-1, each (length, D/2)."""
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: torch.Tensor, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for arbitrary positions (Bm, T) -> each (Bm, 1, T, D/2); padding (-1) gets position 0.

        `max_pos` (a host-side bound on positions, so no device sync) beyond the table means a streaming
        model running past block_size: those angles are computed on the fly, in float64 like the table.
        """
        pos = positions.clamp(min=0)
        if max_pos < self.block_size:
            return self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(pos.device)  # (D/2,)
        angles = pos.double()[..., None] * inv_freq  # (Bm, T, D/2)
        return torch.cos(angles).float().unsqueeze(1), torch.sin(angles).float().unsqueeze(1)


class SinusoidalEmbedding(nn.Module):
    """Fixed sinusoidal position table (block_size, C) as a non-persistent float32 buffer."""

    def __init__(self, dim: int, block_size: int):
        super().__init__()
        self.register_buffer("table", torch.empty(block_size, dim), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        with torch.no_grad():
            self.table.copy_(sinusoidal_table(*self.table.shape))

    def forward(self, start: int, length: int) -> torch.Tensor:
        return self.table[start : start + length]  # (T, C)
