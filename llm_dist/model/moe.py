"""Mixture-of-Experts feed-forward layer: router, top-k gates, vectorised dispatch, auxiliary losses.

For N tokens x (N, C), E experts, k experts per token:

    logits = router(x)                         (N, E), computed in (at least) float32
    scores = softmax(logits) | sigmoid(logits)
    w, e   = topk(scores, k)                   (N, k) the chosen experts and their scores
    gates  = w / sum(w)                        renormalised over the k chosen experts
    y      = sum_j gates[:, j] * expert_{e[:, j]}(x)   [+ shared_expert(x)]

Dispatch without a Python loop over tokens or experts: the N*k (token, expert) assignments are sorted by
expert (stable, so ties keep token order), each gets its rank within its expert, and the tokens are
gathered into one (E, capacity, C) buffer; the experts then run as batched matmuls (E, cap, C) @ (E, C, H)
and the outputs are gathered back per assignment, weighted by the gates and summed over the k choices.
Capacity: `capacity_factor` f > 0 gives each expert ceil(f * N * k / E) slots, and assignments past an
expert's capacity (in token order) are dropped: they add nothing, the token still flows through the
residual (and the shared expert). f = 0 is dropless: capacity = the busiest expert's load.

Auxiliary losses (recorded on the module after every forward as `aux_loss`, added by the LM loss):
    load balance (Switch, Fedus et al. 2021):  E * sum_e f_e * P_e
        f_e = fraction of the N*k assignments routed to e,  P_e = mean over tokens of the router's
        probability for e (softmax scores; sigmoid scores are first normalised to sum to 1 per token).
        Equals 1 when routing is uniform, grows as load concentrates. Only P_e carries gradient.
    router z-loss (ST-MoE, Zoph et al. 2022):  mean over tokens of logsumexp(logits)^2
        keeps router logits small, so the float32 softmax stays well conditioned.
    aux_loss = aux_loss_coef * load_balance + z_loss_coef * z_loss

Data parallelism: every expert's weights enter the batched matmuls whatever the routing, so an expert
that receives no token still gets a (zero) gradient; DDP's reducer never sees an unused parameter, and
FSDP shards the (E, ...) expert tensors like any other parameter. Experts have no biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_dist.config import ModelConfig
from llm_dist.model.init import normal_
from llm_dist.model.layers import MLP, _init_linear, make_linear, mlp_hidden_size, upcast


def load_balance_loss(scores: torch.Tensor, experts: torch.Tensor, num_experts: int, router: str) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e. scores: (N, E) router scores; experts: (N, k) chosen ids."""
    N, k = experts.shape
    flat = experts.reshape(-1)  # (N*k,)
    # scatter_add, not bincount: bincount reads the max id back to size its output (a host sync on CUDA)
    counts = torch.zeros(num_experts, dtype=scores.dtype, device=scores.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=scores.dtype))  # (E,)
    f = counts / (N * k)  # (E,) no grad
    probs = scores if router == "softmax" else scores / scores.sum(dim=-1, keepdim=True)  # (N, E)
    P = probs.mean(dim=0)  # (E,)
    return num_experts * (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2. logits: (N, E)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoE(nn.Module):
    """A routed mixture of `num_experts` MLP experts (GELU or SwiGLU, like the dense MLP), top-k gates.

    Parameters: router.weight (E, C); w_up (E, C, H); w_gate (E, C, H) for SwiGLU; w_down (E, H, C);
    shared.* (an `MLP` of width H) with `shared_expert`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        C = cfg.n_embd
        H = m.expert_hidden or mlp_hidden_size(cfg)
        self.num_experts, self.top_k, self.router_kind = m.num_experts, m.top_k, m.router
        self.capacity_factor, self.aux_coef, self.z_coef = m.capacity_factor, m.aux_loss_coef, m.z_loss_coef
        self.kind = cfg.mlp
        self.router = make_linear(cfg, C, m.num_experts, bias=False)
        E = m.num_experts
        self.w_up = nn.Parameter(torch.empty(E, C, H))
        self.w_gate = nn.Parameter(torch.empty(E, C, H)) if cfg.mlp == "swiglu" else None
        self.w_down = nn.Parameter(torch.empty(E, H, C))
        self.shared = MLP(cfg, hidden=H) if m.shared_expert else None
        self.dropout = nn.Dropout(cfg.dropout)
        # Set by every forward: the weighted auxiliary loss (with graph) and detached routing statistics.
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def init_weights(self, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
        _init_linear(self.router, std, generator)
        normal_(self.w_up, std, generator)
        if self.w_gate is not None:
            normal_(self.w_gate, std, generator)
        normal_(self.w_down, out_std, generator)  # writes into the residual stream
        if self.shared is not None:
            self.shared.init_weights(std, out_std, generator)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> gates (N, k), experts (N, k) int64, router logits (N, E) and scores (N, E), >= float32."""
        logits = upcast(self.router(x))  # (N, E): routing decisions are precision-sensitive; at least fp32
        scores = F.softmax(logits, dim=-1) if self.router_kind == "softmax" else torch.sigmoid(logits)
        w, experts = torch.topk(scores, self.top_k, dim=-1)  # (N, k)
        gates = w / w.sum(dim=-1, keepdim=True)
        return gates, experts, logits, scores

    def capacity(self, n_tokens: int, counts: torch.Tensor) -> int:
        """Slots per expert: ceil(f * N * k / E), or (dropless) the busiest expert's load."""
        if self.capacity_factor > 0:
            return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts))
        return max(1, int(counts.max()))  # a host sync: the buffer's shape depends on the routing

    def experts(self, h: torch.Tensor) -> torch.Tensor:
        """All experts at once on their token buffers: h (E, cap, C) -> (E, cap, C)."""
        up = torch.bmm(h, self.w_up.to(h.dtype))  # (E, cap, H)
        if self.w_gate is not None:
            a = F.silu(torch.bmm(h, self.w_gate.to(h.dtype))) * up
        else:
            a = F.gelu(up, approximate="tanh")
        return torch.bmm(a, self.w_down.to(h.dtype))  # (E, cap, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        E, k = self.num_experts, self.top_k
        x2 = x.reshape(-1, C)  # (N, C)
        N = x2.shape[0]
        gates, experts, logits, scores = self.route(x2)

        flat_e = experts.reshape(-1)  # (N*k,) assignment a = token * k + j
        order = torch.argsort(flat_e, stable=True)  # assignments grouped by expert, token order within
        sorted_e = flat_e[order]  # (N*k,)
        # Expert boundaries in the sorted assignments. searchsorted rather than bincount: bincount reads
        # the maximum back to size its output (a host sync on CUDA); this has the shape (E+1,) up front.
        bounds = torch.searchsorted(sorted_e, torch.arange(E + 1, device=x.device))  # (E+1,)
        starts = bounds[:-1]  # (E,) first sorted index of each expert
        counts = bounds[1:] - starts  # (E,) assignments per expert
        rank = torch.arange(N * k, device=x.device) - starts[sorted_e]  # (N*k,) place within its expert
        cap = self.capacity(N, counts)

        # Gather the buffer: row (e, j) holds the j-th assignment of expert e, if it has one.
        j = torch.arange(cap, device=x.device)
        src = (starts[:, None] + j[None, :]).clamp(max=N * k - 1)  # (E, cap) index into the sorted assignments
        filled = j[None, :] < counts[:, None]  # (E, cap)
        tok_sorted = order // k  # (N*k,) the token of each sorted assignment
        h = x2[tok_sorted[src]] * filled[..., None].to(x2.dtype)  # (E, cap, C)
        out = self.experts(h).reshape(E * cap, C)  # (E*cap, C)

        # Gather back: assignment a reads row (e, rank) of the output buffer unless it was dropped.
        kept_sorted = rank < cap  # (N*k,)
        row = sorted_e * cap + rank.clamp(max=cap - 1)  # (N*k,)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(N * k, device=x.device)  # sorted position of assignment a
        kept = kept_sorted[inv].view(N, k)  # (N, k)
        y_assign = out[row[inv]].view(N, k, C)  # (N, k, C) each assignment's expert output
        w = (gates * kept).to(x2.dtype)  # (N, k): a dropped assignment contributes nothing
        y = (w[..., None] * y_assign).sum(dim=1)  # (N, C)
        if self.shared is not None:
            y = y + self.shared(x2)

        lb = load_balance_loss(scores, experts, E, self.router_kind)
        zl = z_loss(logits)
        self.aux_loss = self.aux_coef * lb + self.z_coef * zl
        self.stats = {
            "load": (counts.float() / (N * k)).detach(),  # (E,) fraction of assignments per expert
            "dropped": 1.0 - kept.float().mean().detach(),
            "balance_loss": lb.detach(),
            "z_loss": zl.detach(),
        }
        y = y.view(B, T, C)
        return self.dropout(y) if self.dropout.p else y


def moe_layers_of(model: nn.Module) -> list[MoE]:
    """The MoE layers of a (possibly DDP- / compile-wrapped) model."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE layers' weighted auxiliary losses from the latest forward (None for a dense model)."""
    losses = [m.aux_loss for m in moe_layers_of(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


MOE_METRIC_NAMES = ("moe/aux", "moe/balance", "moe/z", "moe/load_max", "moe/load_min", "moe/dropped", "moe/idle")


def moe_metric_tensor(model: nn.Module) -> torch.Tensor | None:
    """Routing statistics of the latest forward as one device tensor (len(MOE_METRIC_NAMES),), None if dense.

    Kept on the device so the trainer can fetch them in the same host sync as the loss and gradient norm.
    Averaged over MoE layers: moe/aux: the weighted aux loss added to the LM loss; moe/balance, moe/z: the
    raw losses; moe/load_max, moe/load_min: the busiest / idlest expert's share of assignments times E
    (1 = uniform); moe/dropped: fraction of assignments dropped by the capacity limit; moe/idle: fraction
    of experts that got no token.
    """
    layers = [m for m in moe_layers_of(model) if m.stats]
    if not layers:
        return None
    E = layers[0].num_experts
    load = torch.stack([m.stats["load"] for m in layers])  # (L, E)
    return torch.stack([
        torch.stack([m.aux_loss.detach().float() for m in layers]).sum(),
        torch.stack([m.stats["balance_loss"] for m in layers]).float().mean(),
        torch.stack([m.stats["z_loss"] for m in layers]).float().mean(),
        (load.max(dim=1).values * E).float().mean(),
        (load.min(dim=1).values * E).float().mean(),
        torch.stack([m.stats["dropped"] for m in layers]).float().mean(),
        (load == 0).float().mean(),
    ])  # (7,)


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """`moe_metric_tensor` as {name: value} for the training log (one host sync), {} for a dense model."""
    vals = moe_metric_tensor(model)
    return {} if vals is None else dict(zip(MOE_METRIC_NAMES, vals.tolist()))
