"""Preference rows (all formats, HH split at the common prefix), tokenised pairs, batches, and the losses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm_dist.reward.data import (PairLoader, hh_messages, pair_tensors, read_pairs, row_to_pair, split_transcripts,
                                  tokenize_pairs)
from llm_dist.reward.loss import RewardLoss, pair_loss
from llm_dist.sft.chat import DataError, add_chat_tokens
from llm_dist.tokenizer import ByteTokenizer
from llm_dist.train.trainer import IGNORE_INDEX

HH_C = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: Yes, 4."
HH_R = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: Sure?\n\nAssistant: Yes, 5."


def test_hh_transcripts_split_at_the_last_assistant_marker():
    prompt, c, r = split_transcripts(HH_C, HH_R)
    assert prompt.endswith("\n\nAssistant:") and (c, r) == ("Yes, 4.", "Yes, 5.")  # "Yes," stays in both
    assert hh_messages(prompt) == [{"role": "user", "content": "What is 2+2?"},
                                   {"role": "assistant", "content": "It is 4."},
                                   {"role": "user", "content": "Sure?"}]
    pair = row_to_pair({"chosen": HH_C, "rejected": HH_R}, "f:1")
    assert pair.prompt[-1] == {"role": "user", "content": "Sure?"} and pair.chosen == "Yes, 4."
    # no markers: the split backs off to a word boundary
    assert split_transcripts("Q: two plus two? A: four", "Q: two plus two? A: five") == \
        ("Q: two plus two? A: ", "four", "five")


def test_row_formats_and_errors():
    p = row_to_pair({"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 1.5}, "f:1")
    assert p.prompt == [{"role": "user", "content": "1+1="}] and p.margin == 1.5
    msgs = [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}]
    assert row_to_pair({"prompt": msgs, "chosen": "a", "rejected": "b"}, "f:2").prompt == msgs
    for row, msg in [({"chosen": "x"}, "expected keys 'chosen' and 'rejected'"),
                     ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
                     ({"prompt": 3, "chosen": "a", "rejected": "b"}, "key 'prompt'"),
                     ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "key 'margin'"),
                     ({"chosen": "same", "rejected": "sane"}, "share no prompt")]:
        with pytest.raises(DataError, match=msg) as e:
            row_to_pair(row, "data.jsonl:7")
        assert str(e.value).startswith("data.jsonl:7:") and "\n" not in str(e.value)


def test_read_pairs_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"p.jsonl:2: invalid JSON"):
        read_pairs(str(f))


def test_tokenised_pairs_keep_their_last_tokens_and_batches_count_pairs():
    tok = add_chat_tokens(ByteTokenizer())
    pairs = [row_to_pair({"prompt": "x" * 50, "chosen": "good", "rejected": "bad"}, "f:1"),
             row_to_pair({"prompt": "1+1=", "chosen": "2", "rejected": "11", "margin": 2.0}, "f:2")]
    tp, cut = tokenize_pairs(tok, pairs, seq_len=16, margin=0.5)
    end = tok.special_tokens["<|end|>"]
    assert cut == 1 and len(tp[0].chosen) == 16 and tp[0].chosen[-1] == end
    assert tok.decode(tp[0].chosen[-5:-1]) == "good" and tp[0].margin == 0.5 and tp[1].margin == 2.0
    x, y, last, margin = pair_tensors([tp[1], None], pad_id=end)
    assert x.shape[0] == 4 and y.tolist() == [0, IGNORE_INDEX] and margin.tolist() == [2.0, 0.0]
    assert x[0, last[0]] == end and x[2, last[2]] == end  # chosen and rejected rows end in <|end|>


def test_pair_loader_resumes_on_another_world_size():
    tok = add_chat_tokens(ByteTokenizer())
    pairs = [row_to_pair({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)}, "f") for i in range(20)]
    tp, _ = tokenize_pairs(tok, pairs, 32, 0.0)
    one = PairLoader(tp, 4, 2, 0, 1, seed=3)
    seen = [one.next_batch() for _ in range(7)]  # crosses the epoch boundary (5 batches per epoch)
    two = [PairLoader(tp, 4, 2, r, 2, seed=3) for r in range(2)]
    for ld in two:
        ld.load_state_dict(PairLoader(tp, 4, 2, 0, 1, seed=3).state_dict())
    for ref in seen:
        parts = [ld.next_batch() for ld in two]
        assert [_pairs(mb) for mb in parts[0] + parts[1]] == [_pairs(mb) for mb in ref]


def _pairs(mb):
    """The (chosen, rejected) token lists of a micro-batch (x (2m, T), y, last (2m,), margin)."""
    x, _, last, _ = mb
    m = x.shape[0] // 2
    return [(x[i, : last[i] + 1].tolist(), x[m + i, : last[m + i] + 1].tolist()) for i in range(m)]


def test_losses_hand_computed():
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    margin = torch.tensor([0.0, 0.5])
    bt = pair_loss(rc, rr, margin)
    assert bt.tolist() == pytest.approx([-torch.log(torch.sigmoid(torch.tensor(1.0))).item(),
                                         -torch.log(torch.sigmoid(torch.tensor(-1.5))).item()])
    assert pair_loss(rc, rr, margin, "hinge").tolist() == pytest.approx([0.0, 1.5])
    const = torch.full((2,), 0.5)  # torch's margin ranking loss takes one constant margin
    torch.testing.assert_close(pair_loss(rc, rr, const, "hinge"),
                               F.margin_ranking_loss(rc, rr, torch.ones(2), margin=0.5, reduction="none"))
    centred = pair_loss(rc, rr, margin, center_coef=0.1)
    torch.testing.assert_close(centred, bt + 0.1 * (rc + rr) ** 2)
    big = pair_loss(torch.tensor([100.0]), torch.tensor([-100.0]), torch.zeros(1))
    assert torch.isfinite(big).all() and big.item() == pytest.approx(0.0, abs=1e-30)


class _Scores(torch.nn.Module):
    """A stand-in model whose score at every position is the token id (so rewards are known)."""

    def forward(self, x, head="lm"):
        assert head == "score"
        return x.float()


def test_reward_loss_reads_the_last_token_and_skips_padding_pairs():
    x = torch.tensor([[5, 9, 0], [4, 0, 0], [7, 1, 0], [3, 8, 2]])  # chosen rows 0-1, rejected rows 2-3
    last = torch.tensor([1, 0, 0, 2])  # rewards: chosen 9, 4; rejected 7, 2
    y = torch.tensor([0, IGNORE_INDEX])  # the second pair is padding
    loss_fn = RewardLoss()
    loss, n = loss_fn(_Scores(), (x, y, last, torch.zeros(2)))
    assert n.item() == 1 and loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(2.0)).item())
    s = loss_fn.step_stats(torch.device("cpu"))
    assert s == {"accuracy": 1.0, "margin": 2.0, "reward_chosen": 9.0, "reward_rejected": 7.0}
