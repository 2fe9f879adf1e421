"""LoRA (Hu et al. 2021): low-rank adapters on chosen linear layers of a frozen model.

An adapted layer computes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)

with W and b frozen (the base model's) and only A and B trained. B starts at zero, so the adapted model
equals the base model at step 0; A starts like `nn.Linear`'s own weight (kaiming-uniform, a=sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in)), as the paper's code and peft do), so B's first gradient is not zero.

Applied from outside the model, like the parallelism: `apply_lora` swaps each target `nn.Linear` for a
`LoRALinear` holding the *same* weight and bias parameters plus `lora_A` / `lora_B`, on the meta device,
before activation checkpointing, compile and sharding. Parameter names of the base stay as they were
(`blocks.0.attn.wq.weight`), so base checkpoints load unchanged, and the adapters are
`blocks.{i}.attn.{wq,wk,wv,wo}.lora_{A,B}` / `blocks.{i}.mlp.{up,gate,down}.lora_{A,B}`.
Every other parameter gets requires_grad=False except a scalar head (`score_head`, the reward model's score
or PPO's value), which a fine-tuning stage starts fresh and must train.

`AdaptersOff(model)` calls the model with every adapter switched off, i.e. the frozen base: a fine-tuning
stage's reference policy (DPO) at no extra memory, instead of a second copy of the weights.

`merge_lora_` folds W <- W + (alpha / r) B A in place and turns the layers back into plain `nn.Linear`s:
the export is an ordinary model with the adapted model's outputs.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist.config import LoRAConfig
from llm_dist.model.init import copy_full_

ATTN_TARGETS = ("wq", "wk", "wv", "wo")  # CausalSelfAttention's query/key/value/output projections
MLP_TARGETS = ("up", "gate", "down")  # the dense MLP's matrices (gate: SwiGLU only)
TARGETS = ATTN_TARGETS + MLP_TARGETS
TRAINED_WITH_ADAPTERS = ("score_head.",)  # parameters a LoRA run still trains in full (fresh heads)


def parse_targets(targets: str) -> list[str]:
    """'wq, wv' -> ['wq', 'wv'] (validated against TARGETS by the config's validation)."""
    return [t.strip() for t in targets.split(",") if t.strip()]


class LoRALinear(nn.Linear):
    """`nn.Linear` plus a low-rank update: y = x W^T + b + scaling * dropout(x) A^T B^T (see the module doc).

    It shares (does not copy) the base layer's `weight` and `bias` parameters, so building it on the meta
    device costs nothing and the base's state-dict keys are unchanged.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's parameters are reused, not re-created
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=dev, dtype=dt))  # (out, r)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_on = True  # False inside `adapters_off`: the layer is its frozen base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out): the frozen base
        if not self.adapters_on:
            return y
        # Low rank first: x A^T is (..., r), so the update costs O(r (in + out)) per token, never in x out.
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def init_adapters(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a=sqrt(5)), B = 0; drawn on the CPU in full and
        copied in (each rank keeps its shard), like every other init (llm_dist/model/init.py)."""
        if self.lora_A.is_meta:
            return
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        copy_full_(self.lora_A, a)
        copy_full_(self.lora_B, torch.zeros(self.lora_B.shape))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _target_layers(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of every linear layer to adapt: each block's attention and dense MLP."""
    from llm_dist.model.layers import MLP  # the model's own MLP class (MoE experts are not nn.Linear)

    out = []
    for name, mod in model.named_modules():
        if name.endswith(".attn") or (name.endswith(".mlp") and isinstance(mod, MLP)):
            for t in targets:
                if isinstance(getattr(mod, t, None), nn.Linear):
                    out.append((mod, t))
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Swap the target linears of `model` (before AC/compile/sharding, usually on meta) for `LoRALinear`s and
    freeze everything but the adapters (and a score head). Returns the number of adapted layers."""
    layers = _target_layers(model, parse_targets(cfg.targets))
    if not layers:
        raise ValueError(f"model.lora.targets={cfg.targets!r}: no such linear layer in this model")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINED_WITH_ADAPTERS))
    for parent, attr in layers:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg.rank, cfg.alpha, cfg.dropout))
    return len(layers)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Within the block every LoRA layer of `model` computes its base alone (under compile the flag is a
    guard: the base graph is compiled once more, then both are cached)."""
    layers = lora_layers(model)
    for layer in layers:
        layer.adapters_on = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapters_on = True


class AdaptersOff:
    """`model` called with its adapters switched off: the base model, which is the initial policy of a LoRA
    fine-tune (B starts at 0) and stays so (the base is frozen). Used as DPO's reference with no second copy
    of the weights; call it under no_grad (the sharded/DDP-wrapped policy runs as a plain forward then)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_off(self.model):
            return self.model(*args, **kwargs)


def init_lora_(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Initialise every adapter (A random, B zero) after the model was materialised and initialised."""
    for layer in lora_layers(model):
        layer.init_adapters(generator)


def trainable_names(model: nn.Module) -> list[str]:
    """Bare names (no activation-checkpoint prefix) of the parameters that train: what a LoRA checkpoint holds."""
    return [n.replace("._checkpoint_wrapped_module", "") for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, W <- W + scaling * B A (computed in float64, cast back once), and
    replace the `LoRALinear`s with plain `nn.Linear`s holding the merged weights. Unsharded models only.
    Returns `model`, now without LoRA parameters and with all parameters trainable again."""
    for name, mod in list(model.named_modules()):
        for attr, child in list(mod.named_children()):
            if not isinstance(child, LoRALinear):
                continue
            delta = child.lora_B.double() @ child.lora_A.double() * child.scaling  # (out, in)
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                              device=child.weight.device, dtype=child.weight.dtype)
            plain.weight.copy_((child.weight.double() + delta).to(child.weight.dtype))
            if child.bias is not None:
                plain.bias.copy_(child.bias)
            setattr(mod, attr, plain)
    model.requires_grad_(True)
    return model
