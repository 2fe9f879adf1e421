"""The DPO launcher end to end: TRL's metric names from step 0 (held-out too), it learns an easy preference,
resumes bit for bit (live and precomputed reference), 2 FSDP ranks equal one process, and a precomputed
reference gives the losses of a live one."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tests.helpers import final_params, read_metrics, run_launcher

TRL = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """'a+b=' prompts preferring "yes yes" to "no", half of them as HH transcripts split at their prefix."""
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("dpo")
    with (d / "pairs.jsonl").open("w") as f:
        for i in range(64):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if i % 2:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": "yes yes", "rejected": "no"}) + "\n")
            else:
                f.write(json.dumps({"chosen": f"\n\nHuman: say {a}\n\nAssistant: yes yes",
                                    "rejected": f"\n\nHuman: say {a}\n\nAssistant: no"}) + "\n")
    return d / "pairs.jsonl"


@pytest.fixture(scope="module")
def live(pairs, tmp_path_factory):
    """4 steps with a live reference, a checkpoint every 2: the baseline of the resume, FSDP and precompute tests."""
    out = tmp_path_factory.mktemp("live") / "a"
    run_launcher(_args(pairs, out, "train.max_steps=4", "checkpoint.interval=2"))
    return out


def _args(data, out, *extra):
    return ["launch/dpo.py", "model.preset=debug", "model.block_size=32", "tokenizer.name=byte", f"dpo.data={data}",
            "dpo.eval_fraction=0.25", "dpo.beta=0.5", "train.batch_size=8", "train.micro_batch_size=2",
            "train.dtype=fp32", "train.deterministic=true", "optim.warmup_steps=0", "optim.schedule=constant",
            "optim.lr=3e-3", "parallel.device=cpu", "eval.interval=0", "train.log_interval=1",
            "checkpoint.resume=auto", f"out_dir={out}", *extra]


def test_dpo_logs_trl_metrics_from_step_0_and_learns(pairs, tmp_path):
    p = run_launcher(_args(pairs, tmp_path / "one", "train.max_steps=12", "eval.interval=6", "dpo.eval_examples=4",
                           "dpo.max_new_tokens=4"))
    assert "reference: frozen copy of the seeded init" in p.stdout
    m = read_metrics(tmp_path / "one")
    steps = [r for r in m if "rewards/chosen" in r and "loss" in r]
    evals = [r for r in m if "val/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13)) and [r["step"] for r in evals] == [0, 6, 12]
    for key in TRL:
        assert key in steps[-1] and f"val/{key}" in evals[0], key
    assert "val/exact_match" in evals[0]
    # step 0 and step 1: the policy is its reference, so h = 0 for every pair: loss ln 2, no reward, no "accuracy"
    assert evals[0]["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["val/rewards/margins"] == 0.0 and evals[0]["val/rewards/accuracies"] == 0.0
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    last = evals[-1]
    assert last["val/rewards/accuracies"] == 1.0 and last["val/rewards/margins"] > 1.0
    assert last["val/loss"] < 0.3 and last["val/rewards/chosen"] > last["val/rewards/rejected"]


def test_resume_is_exact_and_two_fsdp_ranks_equal_one(pairs, live, tmp_path):
    common = ("train.max_steps=4", "checkpoint.interval=2")
    run_launcher(_args(pairs, tmp_path / "res", *common, "train.max_steps=2"))
    run_launcher(_args(pairs, tmp_path / "res", *common))
    run_launcher(_args(pairs, tmp_path / "fsdp", *common, "parallel.strategy=fsdp"), nproc=2)
    a, res, fsdp = final_params(live), final_params(tmp_path / "res"), final_params(tmp_path / "fsdp")
    for k in a:
        assert torch.equal(res[k], a[k]), k
        if not k.endswith("attn.wk.bias"):  # exactly-zero true gradient: Adam amplifies float noise
            torch.testing.assert_close(fsdp[k], a[k], atol=1e-5, rtol=1e-5)
    la = [r["loss"] for r in read_metrics(live) if "loss" in r]
    lf = [r["loss"] for r in read_metrics(tmp_path / "fsdp") if "loss" in r]
    assert lf == pytest.approx(la, abs=1e-5)


def test_precomputed_reference_equals_live_and_resumes_from_its_cache(pairs, live, tmp_path):
    common = ("train.max_steps=4", "checkpoint.interval=2", "dpo.precompute_ref=true")
    p = run_launcher(_args(pairs, tmp_path / "pre", *common))
    assert "reference: log-probs computed in one pass" in p.stdout
    assert (tmp_path / "pre" / "dpo_ref_logps.safetensors").exists()
    run_launcher(_args(pairs, tmp_path / "res", *common, "train.max_steps=2"))
    p = run_launcher(_args(pairs, tmp_path / "res", *common))
    assert "reference: log-probs read from" in p.stdout  # not recomputed under the moved policy
    pre, res = final_params(tmp_path / "pre"), final_params(tmp_path / "res")
    for k in pre:
        assert torch.equal(res[k], pre[k]), k
    m_pre, m_live = read_metrics(tmp_path / "pre"), read_metrics(live)
    assert len(m_pre) == len(m_live)
    for a, b in zip(m_pre, m_live):
        for key in ("loss", "val/loss", *TRL):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_simpo_needs_no_reference_and_bad_smoothing_is_one_line(pairs, tmp_path):
    p = run_launcher(_args(pairs, tmp_path / "s", "train.max_steps=2", "dpo.loss=simpo", "dpo.beta=2.0"))
    assert "reference: none" in p.stdout
    steps = [r for r in read_metrics(tmp_path / "s") if "loss" in r and "rewards/chosen" in r]
    # rewards are beta * length-averaged policy log-probs
    assert steps[0]["rewards/chosen"] == pytest.approx(2.0 * steps[0]["logps/chosen"], rel=1e-6)
    p = run_launcher(_args(pairs, tmp_path / "bad", "dpo.label_smoothing=0.5"), check=False)
    assert p.returncode == 2 and "dpo.label_smoothing" in p.stderr and "[0, 0.5)" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_dpo_with_lora_reference_is_the_policy_with_adapters_off(pairs, live, tmp_path):
    """LoRA DPO: the reference is the policy with its adapters switched off (no copy). At step 1 the policy is
    the base (B = 0), so rewards are exactly 0; afterwards the losses equal a run whose reference is a separate
    precomputed copy of the base, and the checkpoint holds only adapters."""
    common = ["train.max_steps=3", f"dpo.init_from={live}", "model.lora.rank=4", "model.lora.alpha=8",
              "model.lora.targets=wq,wv,up,down"]
    p = run_launcher(_args(pairs, tmp_path / "off", *common))
    assert "adapters switched off" in p.stdout
    run_launcher(_args(pairs, tmp_path / "copy", *common, "dpo.precompute_ref=true"))
    off = [r for r in read_metrics(tmp_path / "off") if "rewards/chosen" in r and "loss" in r]
    cp = [r for r in read_metrics(tmp_path / "copy") if "rewards/chosen" in r and "loss" in r]
    assert off[0]["rewards/chosen"] == 0.0 and off[0]["rewards/rejected"] == 0.0
    assert len(off) == len(cp) == 3
    for a, b in zip(off, cp):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["rewards/margins"] - b["rewards/margins"]) <= 1e-6
    assert off[-1]["rewards/margins"] != 0.0  # the adapters trained
    from llm_dist.checkpoint.tools import read_dcp_metadata

    ck = tmp_path / "off" / "checkpoints" / "step_00000003"
    keys = [k for k in read_dcp_metadata(str(ck)).state_dict_metadata if k.startswith("model.")]
    assert keys and all(".lora_" in k for k in keys)  # an adapter-only checkpoint
