"""The reward-model launcher end to end: it learns an easy preference, logs pairwise metrics, resumes exactly,
and 2 DDP ranks (with an untied, frozen LM head) and 2 FSDP ranks equal one process."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.helpers import final_params, read_metrics, run_launcher


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Prompts 'a+b=' with the true sum preferred to a wrong one, and 'say yes' pairs that are trivial to rank."""
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("rm")
    with (d / "pairs.jsonl").open("w") as f:
        for i in range(80):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if i % 2:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": "yes yes", "rejected": "no"}) + "\n")
            else:  # HH transcripts, split at their common prefix
                f.write(json.dumps({"chosen": f"\n\nHuman: say {a}\n\nAssistant: yes yes",
                                    "rejected": f"\n\nHuman: say {a}\n\nAssistant: no"}) + "\n")
    return d / "pairs.jsonl"


def _args(data, out, *extra):
    return ["launch/reward.py", "model.preset=debug", "model.block_size=32", "tokenizer.name=byte",
            f"reward.data={data}", "reward.eval_fraction=0.25", "reward.center_coef=0.01", "train.batch_size=8",
            "train.micro_batch_size=2", "train.dtype=fp32", "train.deterministic=true", "optim.warmup_steps=0",
            "optim.schedule=constant", "optim.lr=3e-3", "parallel.device=cpu", "eval.interval=0",
            "train.log_interval=1", "checkpoint.resume=auto", f"out_dir={out}", *extra]


def test_reward_model_learns_resumes_and_two_ranks_equal_one(pairs, tmp_path):
    run_launcher(_args(pairs, tmp_path / "one", "train.max_steps=16", "eval.interval=16"))
    m = read_metrics(tmp_path / "one")
    steps = [r for r in m if "accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))
    for key in ("loss", "margin", "reward_chosen", "reward_rejected", "grad_norm"):
        assert key in steps[-1], key
    evals = [r for r in m if "val/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 16]  # held-out metrics before the first step, then per interval
    assert set(evals[0]) == set(evals[1])
    ev = evals[-1]
    assert ev["val/accuracy"] == 1.0 and ev["val/margin"] > 0.5  # "yes yes" beats "no" on held-out pairs
    assert ev["val/loss"] < steps[0]["loss"] and ev["val/loss"] < evals[0]["val/loss"]

    common = ("train.max_steps=4", "checkpoint.interval=2")
    run_launcher(_args(pairs, tmp_path / "a", *common))
    run_launcher(_args(pairs, tmp_path / "res", "train.max_steps=4", "checkpoint.interval=2", "train.max_steps=2"))
    run_launcher(_args(pairs, tmp_path / "res", *common))
    run_launcher(_args(pairs, tmp_path / "fsdp", *common, "parallel.strategy=fsdp"), nproc=2)
    a, res, fsdp = (final_params(tmp_path / n) for n in ("a", "res", "fsdp"))
    assert "score_head.weight" in a
    for k in a:
        assert torch.equal(res[k], a[k]), k
        if not k.endswith("attn.wk.bias"):  # exactly-zero true gradient: Adam amplifies float noise
            torch.testing.assert_close(fsdp[k], a[k], atol=1e-5, rtol=1e-5)


def test_untied_head_is_frozen_under_ddp(pairs, tmp_path):
    args = ("train.max_steps=3", "model.tie_embeddings=false")
    run_launcher(_args(pairs, tmp_path / "one", *args))
    run_launcher(_args(pairs, tmp_path / "ddp", *args), nproc=2)
    one, ddp = final_params(tmp_path / "one"), final_params(tmp_path / "ddp")
    assert torch.equal(ddp["lm_head.weight"], one["lm_head.weight"])  # frozen: still the shared seeded init
    for k in one:
        if not k.endswith("attn.wk.bias"):  # exactly-zero true gradient: Adam amplifies float noise
            torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-5)


def test_bad_reward_data_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    p = run_launcher(["launch/reward.py", f"reward.data={bad}", f"out_dir={tmp_path / 'o'}"], check=False)
    assert p.returncode == 2 and "bad.jsonl:1" in p.stderr and "'rejected'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
