"""PPO formulas against float64 references written as plain per-token loops, and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from llm_dist.rl.ppo import (AdaptiveKL, gae, kl_per_token, masked_moments, ppo_token_loss, token_rewards,
                             variance_from_moments, whiten)


def _close(t, nested):
    torch.testing.assert_close(t, torch.tensor(nested, dtype=t.dtype))


def _layout(lengths_prompt, lengths_comp, T):
    mask = torch.zeros(len(lengths_prompt), T, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(lengths_prompt, lengths_comp)):
        mask[i, p - 1: p - 1 + c] = True  # completion targets sit at positions p-1 .. p+c-2
    return mask


def test_gae_matches_a_per_sequence_loop():
    g = torch.Generator().manual_seed(0)
    mask = _layout([3, 1, 5], [4, 6, 1], T=8)
    rewards = torch.randn(3, 8, generator=g, dtype=torch.float64)
    values = torch.randn(3, 8, generator=g, dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(3):
        idx = mask[i].nonzero().flatten().tolist()
        a_next = 0.0
        want = {}
        for k in reversed(range(len(idx))):
            t = idx[k]
            v_next = values[i, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[i, t].item() + gamma * v_next - values[i, t].item()
            a_next = delta + gamma * lam * a_next
            want[t] = a_next
        for t in range(8):
            exp_a = want.get(t, 0.0)
            assert adv[i, t].item() == pytest.approx(exp_a, abs=1e-12)
            exp_r = exp_a + values[i, t].item() if t in want else 0.0
            assert ret[i, t].item() == pytest.approx(exp_r, abs=1e-12)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    mask = _layout([2], [3], T=4)  # completion at positions 1, 2, 3
    rewards = torch.tensor([[0.0, -0.1, -0.2, 1.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, 0.25, 0.125]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    _close(adv, [[0.0, 0.7 - 0.5, 0.8 - 0.25, 1.0 - 0.125]])
    _close(ret, [[0.0, 0.7, 0.8, 1.0]])


def test_token_rewards_put_the_score_on_the_last_completion_token():
    mask = _layout([2, 3], [2, 1], T=4)
    kl = torch.full((2, 4), 0.5)
    r = token_rewards(torch.tensor([1.0, -2.0]), kl * mask, mask, kl_coef=0.1)
    _close(r, [[0.0, -0.05, -0.05 + 1.0, 0.0], [0.0, 0.0, -0.05 - 2.0, 0.0]])


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    d = ref - logp
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx((torch.exp(d) - d - 1).tolist())
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1 | k3"):
        kl_per_token(logp, ref, "k2")


def test_whitening_uses_global_moments_and_matches_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    # two "ranks" holding rows 0-1 and 2-3: the summed moments equal those of the whole tensor
    parts = masked_moments(x[:2], mask[:2]) + masked_moments(x[2:], mask[2:])
    torch.testing.assert_close(parts, masked_moments(x, mask))
    w = whiten(x, mask, parts)
    vals = x[mask]
    torch.testing.assert_close(w[mask], (vals - vals.mean()) / torch.sqrt(vals.var() + 1e-8))
    assert (w[~mask] == 0).all()
    assert variance_from_moments(*parts.tolist()) == pytest.approx(vals.var().item())


def test_ppo_loss_hand_computed():
    # two tokens: A > 0 with ratio 1.5 (clipped at 1.2), A < 0 with ratio 0.5 (clipped at 0.8)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    adv = torch.tensor([[2.0, -1.0]])
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = ppo_token_loss(logp, old, adv, values, old_values, returns, cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
    # pg = max(-A r, -A clip(r)): token 0: max(-3, -2.4) = -2.4; token 1: max(0.5, 0.8) = 0.8
    _close(out["pg"], [[-2.4, 0.8]])
    assert out["clipped"].tolist() == [[1.0, 1.0]]
    # value: token 0: v=1 vs clipped 0.5+0.2=0.7 -> max(1, 0.49) = 1 -> 0.5; token 1: 0.5 * 1 = 0.5
    _close(out["vf"], [[0.5, 0.5]])
    _close(out["loss"], [[-2.4 + 0.25, 0.8 + 0.25]])
    # the clipped value is worse for a value that moved towards the return: value clipping binds
    out2 = ppo_token_loss(old, old, adv, torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]),
                          torch.tensor([[0.0, 0.0]]), 0.2, 0.2, 1.0)
    assert out2["vf"][0, 0].item() == pytest.approx(0.5 * 0.8 ** 2) and out2["vf_clipped"][0, 0] == 1.0
    # gradient: within the clip range the policy gradient is -A * d ratio
    lp = torch.zeros(1, 1, requires_grad=True)
    ppo_token_loss(lp, torch.zeros(1, 1), torch.tensor([[3.0]]), torch.zeros(1, 1), torch.zeros(1, 1),
                   torch.zeros(1, 1), 0.2, 0.0, 0.0)["loss"].sum().backward()
    assert lp.grad.item() == pytest.approx(-3.0)


def test_adaptive_kl_controller():
    c = AdaptiveKL(0.1, target=1.0, horizon=100)
    c.update(kl=2.0, n_samples=10)  # error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    c.update(kl=0.9, n_samples=50)
    assert c.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.5))
    off = AdaptiveKL(0.1, 1.0, 100, enabled=False)
    off.update(5.0, 10)
    assert off.value == 0.1
    assert math.isfinite(c.value)
