"""Multiple-choice evaluation: both JSONL shapes, errors, scores against one-row-at-a-time float64 references,
and 2 ranks (gloo, spawned processes) equal to one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llm_dist.config import ModelConfig
from llm_dist.eval.lm import evaluate_lm, token_byte_lengths
from llm_dist.eval.multiple_choice import (MCExample, MCFormatError, encode_rows, evaluate_mc, join_parts, load_mc,
                                           score_rows)
from llm_dist.model.transformer import build_model
from llm_dist.tokenizer import load_tokenizer

HELLASWAG_ROWS = [  # the fields of HellaSwag's own JSONL (hellaswag_val.jsonl), shortened
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx": "A lady walks to a barbell. She bends down and grabs the pole.",
     "split": "val", "label": "2", "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                                               "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples() -> list[MCExample]:
    """Seven plain-format questions (an odd count: two ranks get 4 and 3)."""
    base = "ROMEO:\nBut soft! what light through yonder window breaks?\nIt is the east, and Juliet is the"
    endings = [" sun.", " moon and stars.", " west.", " night, my lord."]
    return [MCExample(base[i:] if i else base, endings[i % 4:] + endings[:i % 4], i % 4) for i in range(7)]


def tiny_model(vocab: int, block: int = 48) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)
    return build_model(cfg, "cpu", seed=0).double()


def test_hellaswag_and_plain_files_give_the_same_examples(tmp_path: Path) -> None:
    hs = load_mc(write_jsonl(tmp_path / "hs.jsonl", HELLASWAG_ROWS))
    plain = load_mc(write_jsonl(tmp_path / "plain.jsonl", [
        {"context": r["ctx"], "endings": r["endings"], "label": int(r["label"])} for r in HELLASWAG_ROWS]))
    assert hs == plain
    assert [e.label for e in hs] == [3, 2]
    assert hs[0].context == "A man is sitting on a roof. he"
    assert load_mc(tmp_path / "hs.jsonl", limit=1) == hs[:1]


@pytest.mark.parametrize("row, message", [
    ({"context": "a", "endings": ["b", "c"], "label": 2}, "'label' must be an integer index"),
    ({"context": "a", "endings": ["b"], "label": 0}, "at least 2 non-empty strings"),
    ({"endings": ["b", "c"], "label": 0}, "'ctx' (HellaSwag) or 'context'"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, row: object, message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [HELLASWAG_ROWS[0], row])
    with pytest.raises(MCFormatError, match=rf"bad\.jsonl:2: .*{_re(message)}"):
        load_mc(path)


def _re(s: str) -> str:
    import re

    return re.escape(s)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"context": "a"\n')
    with pytest.raises(MCFormatError, match=r"x\.jsonl:1: invalid JSON"):
        load_mc(tmp_path / "x.jsonl")
    with pytest.raises(MCFormatError, match="not found"):
        load_mc(tmp_path / "missing.jsonl")


def test_join_adds_one_space_only_when_needed() -> None:
    assert join_parts("he", "is ripping") == ("he", " is ripping")
    assert join_parts("Juliet is the", " sun.") == ("Juliet is the", " sun.")
    assert join_parts("line one\n", "line two") == ("line one\n", "line two")


def reference_scores(model: torch.nn.Module, tok, ex: MCExample, block: int) -> list[tuple[float, int]]:
    """Per ending: (sum of float64 log-probs of the ending's tokens, count), one unpadded row at a time."""
    out = []
    for ending in ex.endings:
        ctx, end = join_parts(ex.context, ending)
        c, e = tok.encode_ordinary(ctx), tok.encode_ordinary(end)
        ids = (c + e)[-block:]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).double()[0, :, :tok.vocab_size]  # (L, V): padding columns cut
        logp = logits - logits.logsumexp(-1, keepdim=True)
        L = len(ids)
        out.append((sum(logp[j - 1, ids[j]].item() for j in range(L - len(e), L)), len(e)))
    return out


@pytest.mark.parametrize("tok_name", ["byte", "gpt2"])
def test_batched_scores_and_accuracy_match_the_reference(tok_name: str) -> None:
    tok = load_tokenizer(tok_name)
    block = 48 if tok_name == "byte" else 32  # the byte contexts (up to ~95 bytes) are cropped from the left
    model = tiny_model(tok.vocab_size, block)
    exs = examples()
    rows = [r for ex in exs for r in encode_rows(tok, ex, block)]
    got = score_rows(model, rows, torch.device("cpu"))  # one right-padded batch of 28 rows
    ref = [s for ex in exs for s in reference_scores(model, tok, ex, block)]
    assert got[:, 1].tolist() == [n for _, n in ref]
    assert max(abs(g - r) for g, (r, _) in zip(got[:, 0].tolist(), ref)) < 1e-4  # fp32 log-softmax vs float64
    acc = per_token = per_char = 0
    for i, ex in enumerate(exs):
        s = ref[4 * i:4 * i + 4]
        acc += max(range(4), key=lambda k: s[k][0]) == ex.label
        per_token += max(range(4), key=lambda k: s[k][0] / s[k][1]) == ex.label
        per_char += max(range(4), key=lambda k: s[k][0] / len(ex.endings[k])) == ex.label  # lm-eval's len(choice)
    res = evaluate_mc(model, tok, exs, block, batch_size=8)  # 2 examples per forward
    assert res == {"mc/acc": acc / 7, "mc/acc_norm_tokens": per_token / 7, "mc/acc_norm_chars": per_char / 7, "mc/n": 7}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        tok = load_tokenizer("byte")
        model = tiny_model(tok.vocab_size)
        mc = evaluate_mc(model, tok, examples(), 48, batch_size=8)
        # LM: the global batch (4 sequences) split over the ranks like training batches.
        x, y = lm_batch(tok)
        per = x.shape[0] // world
        sl = slice(rank * per, (rank + 1) * per)
        lm = evaluate_lm(model, [[(x[sl], y[sl])]], token_byte_lengths(tok, model.padded_vocab_size))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"mc": mc, "lm": [lm.nll_sum, lm.tokens, lm.bytes]}))
    finally:
        dist.destroy_process_group()


def lm_batch(tok) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    ids = torch.tensor(tok.encode_ordinary("O Romeo, Romeo! wherefore art thou Romeo? " * 6)[: 4 * 40 + 1])
    return ids[:-1].view(4, 40), ids[1:].view(4, 40)


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    tok = load_tokenizer("byte")
    model = tiny_model(tok.vocab_size)
    single_mc = evaluate_mc(model, tok, examples(), 48, batch_size=8)
    x, y = lm_batch(tok)
    single_lm = evaluate_lm(model, [[(x, y)]], token_byte_lengths(tok, model.padded_vocab_size))
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["mc"] == single_mc  # every rank gets the all-reduced counts
        assert got["lm"][1:] == [single_lm.tokens, single_lm.bytes]
        assert math.isclose(got["lm"][0], single_lm.nll_sum, rel_tol=1e-12)
