"""`Trainer.train_step` makes at most one host sync per step, and none before the forward.

On a GPU a host sync (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, ...) makes Python wait for every queued
kernel; one before the forward leaves the GPU idle while the forward's kernels are launched. On CPU there
is no queue, so the test counts the *calls* that would sync on a GPU: every `aten._local_scalar_dense`
(what `.item()`, `float(t)`, `int(t)`, `bool(t)` and `if t:` reach, from Python or C++) through a
TorchDispatchMode, plus `Tensor.tolist/.cpu/.numpy`, which read memory directly without dispatching.
The optimizer's own `.item()` calls are excluded: on CPU AdamW keeps its step counters on the host
(reading them is no sync), and on CUDA the fused AdamW the trainer uses keeps them on the device.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm_dist.model.moe import MoE
from tests.train.test_trainer import _batch, _cfg, _trainer


class SyncCounter(TorchDispatchMode):
    """Records "sync" events (host reads of tensor data) into a shared event list while `active`."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events
        self.active = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if self.active and func is torch.ops.aten._local_scalar_dense.default:
            self.events.append(f"sync:{func.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs(tr, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:  # noqa: ANN001
    """Events "forward" (each model forward) and "sync:..." (each host read) in order, during the block."""
    events: list[str] = []
    counter = SyncCounter(events)
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, _name=name, _orig=original, **k):  # noqa: ANN001, ANN202
            if counter.active:
                events.append(f"sync:{_name}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    def pause(*_a) -> None:  # noqa: ANN002
        counter.active = False

    def resume(*_a) -> None:  # noqa: ANN002
        counter.active = True

    handles = [tr.optimizer.register_step_pre_hook(pause), tr.optimizer.register_step_post_hook(resume),
               tr.raw_model.register_forward_pre_hook(lambda *_a: events.append("forward"))]
    try:
        with counter:
            yield events
    finally:
        for h in handles:
            h.remove()


def _steps(events: list[str]) -> list[list[str]]:
    """Split the event list into steps at each "step" marker."""
    out: list[list[str]] = [[]]
    for e in events:
        if e == "step":
            out.append([])
        else:
            out[-1].append(e)
    return [s for s in out if s]


def test_counter_sees_the_syncs_it_claims_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe itself: each kind of host read is recorded once, plain tensor maths is not."""
    tr = _trainer(_cfg())
    t = torch.ones(3)
    with host_syncs(tr, monkeypatch) as events:
        (t * 2).sum()
        t.sum().item()
        bool(t.sum() > 0)
        float(t[0])
        t.tolist()
        t.cpu()
    assert events == ["sync:_local_scalar_dense.default"] * 3 + ["sync:tolist", "sync:cpu"]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_train_step_syncs_once_after_the_forwards(monkeypatch: pytest.MonkeyPatch, moe: bool) -> None:
    """3 steps of 4 accumulated micro-batches: per step 4 forwards, then exactly one host sync."""
    over = {"train.micro_batch_size": "2", "train.grad_clip": "1.0"}
    if moe:
        # A capacity factor: dropless routing sizes its buffers from the routing, an inherent sync.
        over.update({"model.moe.num_experts": "4", "model.moe.top_k": "2", "model.moe.capacity_factor": "1.5"})
    tr = _trainer(_cfg(**over))
    assert any(isinstance(m, MoE) for m in tr.raw_model.modules()) == moe
    with host_syncs(tr, monkeypatch) as events:
        metrics = []
        for s in range(3):
            x, y = _batch(s)
            metrics.append(tr.train_step([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]))
            events.append("step")
    steps = _steps(events)
    assert len(steps) == 3
    for s in steps:
        assert s[:4] == ["forward"] * 4, s  # nothing read back before (or between) the forwards
        assert s[4:] == ["sync:tolist"], s  # then the step's one sync
    assert tr.state.step == 3 and tr.state.tokens_seen == 3 * 8 * 16
    assert all(m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens"] == 8 * 16 for m in metrics)
    if moe:  # the routing statistics came back in that same sync
        assert all(1.0 <= m["moe/load_max"] <= 4.0 and 0.0 <= m["moe/idle"] <= 1.0 for m in metrics)
        assert all(m["moe/aux"] > 0 for m in metrics)


def test_stop_vote_reaches_the_host_in_the_same_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop request set before a step is agreed at the end of that step, with no extra sync."""
    tr = _trainer(_cfg())
    tr.train_step([_batch(0)])
    assert not tr.should_stop()
    tr.stop.signum = 15  # what the SIGTERM handler sets
    with host_syncs(tr, monkeypatch) as events:
        tr.train_step([_batch(1)])
    assert events == ["forward", "sync:tolist"]
    assert tr.should_stop()
