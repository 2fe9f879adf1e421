"""GRPO formulas against hand-computed cases; all-gathered advantages and loss on 2 gloo ranks equal one process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm_dist.rl.grpo import GRPOLoss, aggregation_weights, group_advantages, grpo_token_loss, k3_kl
from llm_dist.rl.rollout import all_gather_cat, my_samples, sequence_batch
from llm_dist.train.trainer import IGNORE_INDEX


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # two groups of 3
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    want = torch.tensor([2 / 3 / s, -1 / 3 / s, -1 / 3 / s, 0.0, 0.0, 0.0])  # group 2: zero variance -> 0
    torch.testing.assert_close(group_advantages(r, 3, "group", eps=0.0)[:3], want[:3])
    a = group_advantages(r, 3, "group")
    assert torch.isfinite(a).all() and torch.equal(a[3:], torch.zeros(3))
    centred = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(r, 3, "none"), centred)
    # batch std: mean 2/3, squared deviations 4 * 1/9 + 2 * 4/9 = 12/9, unbiased / 5 -> sqrt(4/15)
    torch.testing.assert_close(group_advantages(r, 3, "batch", eps=0.0), centred / math.sqrt(4 / 15))
    assert torch.equal(group_advantages(torch.ones(4), 2, "batch"), torch.zeros(4))  # all equal: no NaN


def test_clipped_ratio_and_k3_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    eps_l, eps_h = 0.2, 0.28
    lp, clip = grpo_token_loss(logp, old, torch.tensor([1.0]), eps_l, eps_h)
    # A > 0: -min(rho, clip(rho)) = -[1.28, 0.5, 1.1]; only the first is clipped
    torch.testing.assert_close(lp, torch.tensor([[-1.28, -0.5, -1.1]]))
    assert clip.tolist() == [[1.0, 0.0, 0.0]]
    ln, clip_n = grpo_token_loss(logp, old, torch.tensor([-2.0]), eps_l, eps_h)
    # A < 0: -min(-2 rho, -2 clip(rho)) = 2 max(rho, clip(rho)) = 2 [1.5, 0.8, 1.1]
    torch.testing.assert_close(ln, torch.tensor([[3.0, 1.6, 2.2]]))
    assert clip_n.tolist() == [[0.0, 1.0, 0.0]]
    ref = torch.log(torch.tensor([[0.75, 0.5, 2.2]]))  # ref/pi = 0.5, 1, 2
    kl = k3_kl(logp, ref)
    torch.testing.assert_close(kl, torch.tensor([[0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1]]))
    lb, _ = grpo_token_loss(logp, old, torch.tensor([1.0]), eps_l, eps_h, ref, beta=0.1)
    torch.testing.assert_close(lb, lp + 0.1 * kl)
    with pytest.raises(ValueError, match="reference"):
        grpo_token_loss(logp, old, torch.tensor([1.0]), eps_l, eps_h, None, beta=0.1)


def test_aggregation_weights_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # lengths 2 and 4
    l = torch.tensor([[1.0, 3.0, 9.0, 9.0], [2.0, 2.0, 2.0, 6.0]])
    n_tok, n_seq = 6, 2
    def agg(name, max_len=8):
        return float((aggregation_weights(mask, n_seq, n_tok, name, max_len) * l * mask).sum() / n_tok)
    assert agg("dapo") == pytest.approx((1 + 3 + 2 + 2 + 2 + 6) / 6)
    assert agg("grpo") == pytest.approx(((1 + 3) / 2 + (2 + 2 + 2 + 6) / 4) / 2)
    assert agg("dr_grpo") == pytest.approx((1 + 3 + 2 + 2 + 2 + 6) / (2 * 8))


def test_sequence_batch_targets_only_completions():
    x, y = sequence_batch([[5, 6], [7]], [[1, 2], [3, 4, 9]], pad_id=0)
    I = IGNORE_INDEX
    assert x.tolist() == [[5, 6, 1], [7, 3, 4]]  # T = longest prompt + completion - 1 = 3
    assert y.tolist() == [[I, 1, 2], [3, 4, 9]]


class _Tiny(torch.nn.Module):
    """A 'language model' whose logits depend on the token only: enough to test the RL plumbing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(12, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x]


def _samples():
    """12 samples = 3 prompts x G=4 with fixed completions and rewards; group 3 has zero variance.
    On 2 ranks each holds 6 samples, so group 2 (samples 4-7) is split between the ranks."""
    g = torch.Generator().manual_seed(3)
    prompts = [[1, 2]] * 4 + [[3]] * 4 + [[2, 5, 1]] * 4
    comps = [torch.randint(4, 12, (int(n),), generator=g).tolist() for n in [2, 3, 1, 4, 2, 2, 3, 1, 1, 2, 4, 3]]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    return prompts, comps, rewards


def _step(rank: int, world: int, agg: str) -> dict[str, torch.Tensor]:
    """One GRPO loss/gradient as the stage computes it, on this rank's share of the samples."""
    prompts, comps, rewards = _samples()
    mine = my_samples(12, rank, world)
    local_r = rewards[mine.start:mine.stop]
    x, y = sequence_batch([prompts[i] for i in mine], [comps[i] for i in mine], pad_id=0)
    lengths = (y != IGNORE_INDEX).sum(1)
    all_r, all_len = all_gather_cat(local_r), all_gather_cat(lengths)
    adv = group_advantages(all_r, 4)[mine.start:mine.stop]
    w = aggregation_weights(y != IGNORE_INDEX, 12, int(all_len.sum()), agg, max_len=4)
    model = _Tiny()
    fn = GRPOLoss(0.2, 0.2, beta=0.0, num_iterations=1)
    zeros = torch.zeros(y.shape)
    loss, n = fn(model, (x, y, zeros, zeros, adv, w))
    # the trainer's normalisation: divide by the global target count, gradients summed over ranks
    total = (loss / all_len.sum()).reshape(1)
    total.backward()
    grad = model.table.grad.clone()
    if world > 1:
        dist.all_reduce(total)
        dist.all_reduce(grad)
    return {"adv": group_advantages(all_r, 4), "loss": total.detach(), "grad": grad}


def _worker(rank: int, world: int, port: int, agg: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_step(rank, world, agg), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("agg", ["grpo", "dapo"])
def test_two_ranks_with_split_groups_equal_one_process(agg, tmp_path):
    one = _step(0, 1, agg)
    # hand check of the single-process advantages: group 1 rewards [1, 0, .5, 0]
    r = torch.tensor([1.0, 0.0, 0.5, 0.0])
    torch.testing.assert_close(one["adv"][:4], (r - r.mean()) / (r.std() + 1e-4))
    assert torch.equal(one["adv"][8:], torch.zeros(4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(2, port, agg, str(tmp_path)), nprocs=2, start_method="spawn")
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)}
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["adv"], one["adv"])
        torch.testing.assert_close(results[rank]["loss"], one["loss"])
        torch.testing.assert_close(results[rank]["grad"], one["grad"])
