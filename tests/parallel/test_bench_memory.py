"""tools/bench_memory.py's accounting against byte counts worked out by hand (one process, tiny models)."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from llm_dist.config import load_config
from llm_dist.distributed import Runtime
from llm_dist.parallel import build_parallel_model
from llm_dist.train.trainer import causal_lm_loss
from tests.helpers import load_tool

F32 = 4  # bytes per fp32 element


@pytest.fixture(scope="module")
def bm():
    return load_tool("bench_memory")


class TiedNet(nn.Module):
    """Embedding(5, 4) tied to a bias-free LM head, and a Linear(4, 4) with bias: 20 + 16 + 4 = 40 floats."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(idx))))


def test_unique_storage_bytes_counts_each_storage_once_and_whole(bm) -> None:
    a = torch.zeros(10)
    b = torch.zeros(3, 2, dtype=torch.float64)
    # A view costs its whole storage (it keeps it alive); a second view of the same storage costs nothing.
    assert bm.unique_storage_bytes([a[2:4], a.view(2, 5), b]) == 10 * F32 + 6 * 8
    seen: set = set()
    assert bm.unique_storage_bytes([a], seen) == 10 * F32
    assert bm.unique_storage_bytes([a[:1], b], seen) == 6 * 8  # `seen` carries across categories


def test_state_bytes_params_grads_adamw(bm) -> None:
    torch.manual_seed(0)
    net = TiedNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.tensor([[0, 1, 2]])).sum().backward()
    opt.step()
    s = bm.state_bytes(net, opt)
    n_floats = 5 * 4 + 4 * 4 + 4  # the tied embedding/head weight once
    assert s["params"] == n_floats * F32
    assert s["grads"] == n_floats * F32
    # AdamW: exp_avg and exp_avg_sq per parameter, plus one fp32 `step` scalar per parameter (3 unique ones).
    assert s["optim"] == 2 * n_floats * F32 + 3 * F32
    assert s["total"] == s["params"] + s["grads"] + s["optim"]
    net.zero_grad(set_to_none=True)
    assert bm.state_bytes(net, opt)["grads"] == 0


def test_activation_meter_on_an_mlp(bm) -> None:
    """Linear(8->16) -> ReLU -> Linear(16->3), batch 5, by hand.

    saved: x (5x8, for the first weight's gradient), relu output (5x16: ReLU's backward and the second
    Linear's input, one storage). Weights and their transposed views are parameters: not counted.
    live after the forward: the relu output and the returned y (5x3); the first Linear's output is freed.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(5, 8)
    with bm.ActivationMeter(net, []) as m:
        y = net(x)
    assert m.saved_bytes == (5 * 8 + 5 * 16) * F32
    assert m.live_bytes == (5 * 16 + 5 * 3) * F32
    y.sum().backward()  # the hooks handed the tensors back unchanged
    assert net[0].weight.grad is not None


def _tiny(ac: list[str]) -> tuple:
    cfg = load_config(None, ["model.vocab_size=64", "model.n_layer=3", "model.n_embd=32", "model.n_head=4",
                             "model.block_size=16", "model.dropout=0.0", *ac])
    return build_parallel_model(cfg, Runtime(), torch.float32).model, cfg


@pytest.mark.parametrize("ac", [["parallel.ac=full"], ["parallel.ac=none"],
                                ["parallel.ac=selective", "parallel.ac_selective=op"],
                                ["parallel.ac=selective", "parallel.ac_selective=layer", "parallel.ac_every=2"]])
def test_activation_meter_on_the_transformer(bm, ac: list[str]) -> None:
    model, cfg = _tiny(ac)
    B, T, C, L = 2, cfg.model.block_size, cfg.model.n_embd, cfg.model.n_layer
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (B, T), generator=g)
    y = torch.randint(0, 64, (B, T), generator=g)
    with bm.ActivationMeter(model, model.blocks) as m:
        loss, _ = causal_lm_loss(model, (x, y))
    block_input = B * T * C * F32
    mode = "/".join(a.split("=")[1] for a in ac)
    if mode == "full":
        # Non-reentrant checkpointing keeps exactly each block's input, and the hooks see exactly that.
        assert m.full_ac_saves_only_inputs()
        assert m.saved_bytes_in("block") == L * block_input
        # live and saved differ only by the token ids (saved, but allocated before the forward) and the
        # loss and target-count scalars (alive, not saved).
        assert abs(m.live_bytes - m.saved_bytes) <= x.nbytes + y.nbytes
    elif mode == "selective/op":
        # Op-level SAC keeps matmul outputs in its own cache: the hooks see only the block inputs, as
        # under full AC, but much more stays alive.
        assert m.full_ac_saves_only_inputs()
        assert m.live_bytes > m.saved_bytes + L * block_input
    else:
        assert not m.full_ac_saves_only_inputs()
        assert m.saved_bytes_in("block") > L * block_input
    loss.backward()


def test_ac_ordering_of_activation_memory(bm) -> None:
    """full < selective-op, selective-layer < none (same model, same batch)."""
    live = {}
    for name, ac in {"none": ["parallel.ac=none"], "full": ["parallel.ac=full"],
                     "op": ["parallel.ac=selective", "parallel.ac_selective=op"],
                     "layer": ["parallel.ac=selective", "parallel.ac_selective=layer"]}.items():
        model, _ = _tiny(ac)
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        with bm.ActivationMeter(model, model.blocks) as m:
            loss, _ = causal_lm_loss(model, (x, x))
        live[name] = m.live_bytes
        del loss
    assert live["full"] < live["op"] < live["none"]
    assert live["full"] < live["layer"] < live["none"]
