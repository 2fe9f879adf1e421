"""SFT data: chat template and masks, row formats and errors, packing, curriculum, resumable batches."""

from __future__ import annotations

import json

import pytest
import torch

from llm_dist.sft.chat import (DataError, add_chat_tokens, answers_match, extract_answer, prompt_ids, read_jsonl,
                               render, row_to_conversation)
from llm_dist.sft.data import Example, SFTLoader, build_row, epoch_order, pack_rows, tokenize
from llm_dist.tokenizer import ByteTokenizer, load_gpt2
from llm_dist.train.trainer import IGNORE_INDEX

TOK = add_chat_tokens(ByteTokenizer())
U, A, E = 258, 259, 260  # <|user|>, <|assistant|>, <|end|> after <|endoftext|>=256, <|system|>=257


def test_chat_tokens_extend_vocab_and_keep_text_ids():
    assert TOK.vocab_size == 261 and TOK.special_tokens["<|end|>"] == E
    assert TOK.encode_ordinary("héllo <|end|>") == ByteTokenizer().encode_ordinary("héllo <|end|>")  # text stays text
    g = load_gpt2()
    g2 = add_chat_tokens(g)
    assert g2.vocab_size == g.vocab_size + 4 and g2.encode_ordinary("Hello world") == g.encode_ordinary("Hello world")
    assert add_chat_tokens(TOK) is TOK


def test_render_masks_only_assistant_content_and_end():
    ids, mask = render(TOK, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}])
    assert ids == [U, 97, 98, E, A, 99, E]
    assert mask == [False, False, False, False, False, True, True]
    assert prompt_ids(TOK, [{"role": "user", "content": "ab"}]) == [U, 97, 98, E, A]


def test_row_formats_and_errors(tmp_path):
    a = row_to_conversation({"prompt": "p", "response": "r"}, "f:1")
    b = row_to_conversation({"question": "p", "answer": "r"}, "f:1")
    c = row_to_conversation({"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}, "f:1")
    assert a.messages == b.messages == c.messages and c.reference == "r"
    with pytest.raises(DataError, match=r"f:3: key 'response' must be a string"):
        row_to_conversation({"prompt": "p"}, "f:3")
    with pytest.raises(DataError, match=r"messages\[1\].role"):
        row_to_conversation({"messages": [{"role": "user", "content": "p"}, {"role": "bot", "content": "r"}]}, "f:1")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        read_jsonl(str(p))


def test_answer_extraction():
    assert extract_answer("so 3+4=7\n#### 1,234", "gsm8k") == "1234"
    assert extract_answer("no marker 12", "gsm8k") is None
    assert extract_answer("a 3 then -4.50", "last_number") == "-4.5"
    assert answers_match("blah #### 72", "Natalia...\n#### 72", "gsm8k")
    assert not answers_match("blah #### 71", "#### 72", "gsm8k")
    assert answers_match(" 579 ", "579", "exact")


def _ex(n_prompt: int, n_resp: int, d: float = 0.0) -> Example:
    ids = list(range(1, n_prompt + n_resp + 1))
    return Example(ids, [False] * n_prompt + [True] * n_resp, d)


def test_pack_rows_next_fit_and_row_tensors():
    exs = [_ex(2, 3), _ex(3, 2), _ex(1, 2)]  # lengths (tokens used) 4, 4, 2
    assert pack_rows(exs, [0, 1, 2], 8, pack=True) == [[0, 1], [2]]
    assert pack_rows(exs, [0, 2, 1], 8, pack=True) == [[0, 2], [1]]
    assert pack_rows(exs, [0, 1, 2], 8, pack=False) == [[0], [1], [2]]
    x, y, seg = build_row(exs, [0, 2], 8, pad_id=0)
    I = IGNORE_INDEX
    assert x.tolist() == [1, 2, 3, 4, 1, 2, 0, 0]
    # example 0 ids 1..5, targets 2..5 where mask[1:] = [F, T, T, T]; example 2 ids 1..3 mask[1:] = [T, T]
    assert y.tolist() == [I, 3, 4, 5, 2, 3, I, I]
    assert seg.tolist() == [0, 0, 0, 0, 1, 1, -1, -1]


def test_curriculum_orders():
    exs = [_ex(5, 1, 2.0), _ex(1, 1, 3.0), _ex(2, 1, 1.0)]
    assert epoch_order(exs, 0, 0, "length") == [1, 2, 0]
    assert epoch_order(exs, 0, 0, "difficulty") == [2, 0, 1]
    assert sorted(epoch_order(exs, 1, 0, "none")) == [0, 1, 2]


def test_tokenize_cuts_and_drops():
    convs = [row_to_conversation({"prompt": "x" * 20, "response": "y"}, "f:1"),
             row_to_conversation({"prompt": "x", "response": "yy"}, "f:2")]
    exs, cut, dropped = tokenize(TOK, convs, seq_len=8)
    assert (cut, dropped, len(exs)) == (1, 1, 1) and exs[0].ids == [U, 120, E, A, 121, 121, E]


def _loader(exs, world=1, rank=0, **kw):
    return SFTLoader(exs, 8, 4, 2, rank, world, seed=3, **kw)


def test_loader_resumes_exactly_and_is_world_size_independent():
    exs = [_ex(1 + i % 3, 1 + i % 2) for i in range(11)]
    ref = _loader(exs)
    seen = [ref.next_batch() for _ in range(6)]  # crosses epoch boundaries
    resumed = _loader(exs)
    a = _loader(exs)
    for _ in range(3):
        a.next_batch()
    resumed.load_state_dict(a.state_dict())
    for k in range(3, 6):
        got = resumed.next_batch()
        for mb_a, mb_b in zip(seen[k], got):
            for ta, tb in zip(mb_a, mb_b):
                assert torch.equal(ta, tb)
    # two ranks: rank 0's and rank 1's micro-batches together are the single rank's rows, in order
    r0, r1 = _loader(exs, 2, 0), _loader(exs, 2, 1)
    for k in range(6):
        rows = torch.cat([mb[0] for mb in r0.next_batch()] + [mb[0] for mb in r1.next_batch()])
        assert torch.equal(rows, torch.cat([mb[0] for mb in seen[k]]))


def test_eval_batches_pad_with_ignored_rows():
    exs = [_ex(1, 2) for _ in range(3)]
    batches = _loader(exs, pack=False).eval_batches(exs)
    assert len(batches) == 1 and sum(int((mb[1] != IGNORE_INDEX).sum()) for mb in batches[0]) == 3 * 2
