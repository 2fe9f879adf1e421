"""DPO's formulas against float64 hand computations written from the papers / TRL, on ragged pairs; the masks
(prompt and padding contribute nothing); the trainer loss with a live reference equals the precomputed one."""

from __future__ import annotations

import math

import pytest
import torch

from llm_dist.align.dpo_loss import LOSSES, DPOLoss, preference_loss, sequence_logps
from llm_dist.config import ModelConfig
from llm_dist.model.transformer import build_model
from llm_dist.reward.data import Pair, pair_tensors, tokenize_pairs
from llm_dist.sft.chat import add_chat_tokens
from llm_dist.sft.chat_format import PROJECT
from llm_dist.tokenizer import load_tokenizer
from llm_dist.train.trainer import IGNORE_INDEX

PAD = 7


def _logsig(z: float) -> float:
    """log sigmoid(z) in plain float arithmetic, stable either side of 0."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _hand_loss(kind, pc, pr, rc, rr, nc, nr, beta, ls, gamma, rpo=0.0):
    """One pair's (loss, chosen reward, rejected reward) in Python floats, straight from the formulas."""
    if rpo:
        loss, rew_c, rew_r = _hand_loss(kind, pc, pr, rc, rr, nc, nr, beta, ls, gamma)
        return loss + rpo * (-pc / nc), rew_c, rew_r
    if kind in ("ipo", "simpo"):
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    if kind == "simpo":
        z = beta * (pc - pr) - gamma
        return -(1 - ls) * _logsig(z) - ls * _logsig(-z), beta * pc, beta * pr
    h = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        loss = -(1 - ls) * _logsig(beta * h) - ls * _logsig(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = max(0.0, 1 - beta * h)
    return loss, beta * (pc - rc), beta * (pr - rr)


@pytest.mark.parametrize("kind,beta,ls,gamma,rpo", [("sigmoid", 0.1, 0.0, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.0, 0.0),
                                                    ("ipo", 0.3, 0.0, 0.0, 0.0), ("hinge", 0.1, 0.0, 0.0, 0.0),
                                                    ("simpo", 2.0, 0.0, 0.5, 0.0), ("simpo", 2.5, 0.1, 1.0, 0.0),
                                                    ("sigmoid", 0.1, 0.0, 0.0, 1.0), ("ipo", 0.3, 0.0, 0.0, 0.5)])
def test_losses_equal_float64_hand_computation(kind, beta, ls, gamma, rpo):
    g = torch.Generator().manual_seed(0)
    m = 16
    logps = -torch.rand(4, m, generator=g, dtype=torch.float64) * 30  # summed log-probs of ragged responses
    n = torch.randint(1, 12, (2, m), generator=g)  # response lengths
    pc, pr, rc, rr = logps
    losses, rew_c, rew_r, lc, lr = preference_loss(pc, pr, rc, rr, n[0], n[1], kind, beta, ls, gamma, rpo)
    assert losses.dtype == torch.float64
    for i in range(m):
        want, want_c, want_r = _hand_loss(kind, *(float(t[i]) for t in logps), int(n[0, i]), int(n[1, i]),
                                          beta, ls, gamma, rpo)
        assert abs(losses[i].item() - want) <= 1e-12 * max(1.0, abs(want)), (i, losses[i].item(), want)
        assert abs(rew_c[i].item() - want_c) <= 1e-12 and abs(rew_r[i].item() - want_r) <= 1e-12
        avg = kind in ("ipo", "simpo")
        assert lc[i].item() == pytest.approx(float(pc[i]) / (int(n[0, i]) if avg else 1), abs=1e-12)
        assert lr[i].item() == pytest.approx(float(pr[i]) / (int(n[1, i]) if avg else 1), abs=1e-12)


def test_gradient_of_dpo_is_trls_closed_form():
    """d loss / d pi_c = -beta * sigma(-beta h) for plain DPO (Rafailov et al., eq. 7's gradient)."""
    pc = torch.tensor([-3.0, -7.0], dtype=torch.float64, requires_grad=True)
    pr, rc, rr = (torch.tensor(v, dtype=torch.float64) for v in ([-4.0, -6.5], [-3.5, -6.0], [-4.2, -6.1]))
    n = torch.ones(2, dtype=torch.long)
    losses, *_ = preference_loss(pc, pr, rc, rr, n, n, "sigmoid", 0.3)
    losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(pc.grad, -0.3 * torch.sigmoid(-0.3 * h.detach()), rtol=0, atol=1e-14)


def _tok():
    return add_chat_tokens(load_tokenizer("byte"))


def _pairs(tok, seq_len=42):
    """Ragged pairs: prompts and responses of different lengths, one truncated into its prompt, one into its
    chosen response."""
    rows = [Pair([{"role": "user", "content": "1+2="}], "3", "4"),
            Pair([{"role": "user", "content": "say something long"}], "a much longer reply", "no"),
            Pair([{"role": "system", "content": "be brief"}, {"role": "user", "content": "77+8="}], "85", "95"),
            Pair([{"role": "user", "content": "x" * 30}], "cut prompt", "cut"),
            Pair([{"role": "user", "content": "long"}], "y" * 45, "z")]
    tp, cut = tokenize_pairs(tok, rows, seq_len, 0.0)
    assert cut == 2 and tp[3].chosen_start == 31 and tp[4].chosen_start == 0 and tp[4].rejected_start > 0
    return tp


def test_targets_are_the_response_tokens_only():
    tok = _tok()
    tp = _pairs(tok)
    x, y, last, _, tgt, ref = pair_tensors(tp + [None], PAD, targets=True)
    m = len(tp) + 1
    assert tgt.shape == x.shape and ref.tolist() == [0.0] * (2 * m)
    for i, p in enumerate(tp + [None]):
        for row, seq, start in ((i, p and p.chosen, p and p.chosen_start),
                                (m + i, p and p.rejected, p and p.rejected_start)):
            want = [IGNORE_INDEX] * x.shape[1]
            if seq is not None:
                for t in range(max(start, 1) - 1, len(seq) - 1):  # position t predicts token t + 1
                    want[t] = seq[t + 1]
                assert seq[-1] == PROJECT.end_id(tok) and want[len(seq) - 2] == seq[-1]  # <|end|> is a target
            assert tgt[row].tolist() == want, row
    assert y.tolist() == [0] * len(tp) + [IGNORE_INDEX]


def test_sequence_logps_matches_float64_loop_and_ignores_prompt_and_padding():
    tok = _tok()
    tp = _pairs(tok)
    x, _, _, _, tgt, _ = pair_tensors(tp, PAD, targets=True)
    g = torch.Generator().manual_seed(1)
    V = 300
    logits = torch.randn(*x.shape, V, generator=g, dtype=torch.float64) * 3
    logps, n = sequence_logps(logits, tgt)
    rows = [(p.chosen, p.chosen_start) for p in tp] + [(p.rejected, p.rejected_start) for p in tp]
    for i, (seq, start) in enumerate(rows):
        want, count = 0.0, 0
        for t in range(max(start, 1), len(seq)):  # every response token that has a predecessor in the window
            row = logits[i, t - 1].tolist()
            mx = max(row)
            want += row[seq[t]] - (mx + math.log(sum(math.exp(v - mx) for v in row)))
            count += 1
        assert n[i].item() == count
        assert logps[i].item() == pytest.approx(want, rel=1e-6, abs=1e-5)  # fp32 log-softmax, as the loss uses
    # prompt and padding positions: anything there changes nothing, bit for bit
    noise = torch.randn(logits.shape, generator=g, dtype=torch.float64) * 50
    masked = (tgt == IGNORE_INDEX)[:, :, None]
    same, _ = sequence_logps(torch.where(masked, logits + noise, logits), tgt)
    assert torch.equal(same, logps)
    moved, _ = sequence_logps(torch.where(masked, logits, logits + noise), tgt)
    assert not torch.isclose(moved, logps).any()


def _tiny_model(seed):
    cfg = ModelConfig(vocab_size=_tok().vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=32)
    return build_model(cfg, "cpu", seed=seed)


@pytest.mark.parametrize("kind", LOSSES)
def test_loss_with_live_reference_equals_precomputed_and_ignores_padding(kind):
    tok = _tok()
    tp = _pairs(tok)
    policy, reference = _tiny_model(0), _tiny_model(1).eval()
    batch = pair_tensors(tp + [None], PAD, targets=True)
    live = DPOLoss(kind, 0.2, 0.1 if kind in ("sigmoid", "simpo") else 0.0, 0.3, reference=reference)
    loss_live, n_live = live(policy, batch)
    with torch.no_grad():
        ref, _ = sequence_logps(reference(batch[0]), batch[4])
    for i, p in enumerate(tp):
        p.ref = (ref[i].item(), ref[len(tp) + 1 + i].item())
    pre = DPOLoss(kind, 0.2, 0.1 if kind in ("sigmoid", "simpo") else 0.0, 0.3)
    loss_pre, n_pre = pre(policy, pair_tensors(tp + [None], PAD, targets=True))
    assert n_live.item() == n_pre.item() == len(tp)  # the padding pair is not counted
    assert torch.equal(loss_live, loss_pre)
    assert torch.equal(live.stats, pre.stats)
    # other padding token ids (and a longer padded width) leave every response log-prob unchanged
    x, y, last, margin, tgt, r = pair_tensors(tp, PAD, targets=True)
    pos = torch.arange(x.shape[1] + 3)[None, :]
    wide = torch.full((x.shape[0], x.shape[1] + 3), 11)
    wide[:, : x.shape[1]] = x
    wide = torch.where(pos > last[:, None], 11, wide)  # every padding position holds another token
    assert not torch.equal(wide[:, : x.shape[1]], x)
    tgt_wide = torch.full_like(wide, IGNORE_INDEX)
    tgt_wide[:, : x.shape[1]] = tgt
    a, _ = pre(policy, (x, y, last, margin, tgt, r))
    b, _ = pre(policy, (wide, y, last, margin, tgt_wide, r))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if kind == "simpo":
        return
    # at the start (policy == reference) every DPO-family loss sits at its h = 0 value
    same = DPOLoss(kind, 0.2, 0.0, 0.0, reference=policy)
    loss0, n0 = same(policy, batch)
    h0 = {"sigmoid": math.log(2), "ipo": (1 / 0.4) ** 2, "hinge": 1.0}[kind]
    assert loss0.item() / n0.item() == pytest.approx(h0, rel=1e-6)


def test_step_stats_have_trls_names_and_means():
    loss = DPOLoss("sigmoid", 0.1)
    loss.stats += torch.tensor([3.0, 1.5, 2.0, 0.5, -10.0, -14.0, 4.0], dtype=torch.float64)
    s = loss.step_stats(torch.device("cpu"))
    assert s == {"rewards/chosen": 0.5, "rewards/rejected": 0.125, "rewards/accuracies": 0.75,
                 "rewards/margins": 0.375, "logps/chosen": -2.5, "logps/rejected": -3.5}
