"""The PPO launcher end to end on a tiny model: the metrics it promises, exact resume at a rollout boundary,
2 FSDP ranks equal 1 process, and a reward model as the scorer with minibatches and the adaptive KL."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import final_params, read_metrics, run_launcher


def _args(init, out, *extra):
    # 16 samples per rollout (8 per rank on 2 ranks), rollout chunks of 8 samples so the generation seeds do
    # not depend on the rank split; 2 epochs x 1 minibatch = 2 optimizer steps per rollout.
    return ["launch/ppo.py", f"rl.init_from={init}", "rl.task_level=1", "rl.group_size=1", "rl.max_new_tokens=4",
            "rl.rollout_batch_size=8", "rl.eval_examples=8", "rl.temperature=1.5", "ppo.epochs=2",
            "ppo.num_minibatches=1", "ppo.kl_coef=0.1", "ppo.kl_estimator=k3", "train.batch_size=16",
            "train.micro_batch_size=4", "train.dtype=fp32", "train.deterministic=true", "train.log_interval=1",
            "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=3e-3", "parallel.device=cpu",
            "eval.interval=0", "checkpoint.interval=2", "checkpoint.resume=auto", f"out_dir={out}", *extra]


def test_ppo_runs_resumes_exactly_and_fsdp_equals_one(sft_init, tmp_path):
    run_launcher(_args(sft_init, tmp_path / "one", "train.max_steps=4"))
    m = read_metrics(tmp_path / "one")
    steps = [r for r in m if "pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("reward_mean", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "value_clip_frac",
                "explained_variance", "grad_norm", "approx_kl", "time_generate", "time_score", "gen_tok_per_s"):
        assert all(key in r and math.isfinite(r[key]) for r in steps), key
    # first step: the old policy is the policy (ratio 1) and the reference (KL 0)
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["reward_mean"] == steps[1]["reward_mean"]  # 2 steps per rollout
    assert steps[2]["kl"] > 0  # the second rollout comes from the updated policy
    assert [r["step"] for r in m if "val/accuracy" in r] == [0, 4]

    run_launcher(_args(sft_init, tmp_path / "res", "train.max_steps=2"))
    run_launcher(_args(sft_init, tmp_path / "res", "train.max_steps=4"))
    run_launcher(_args(sft_init, tmp_path / "fsdp", "train.max_steps=4", "parallel.strategy=fsdp"), nproc=2)
    one, res, fsdp = (final_params(tmp_path / n) for n in ("one", "res", "fsdp"))
    assert "score_head.weight" in one  # the value head is part of the checkpoint
    for k in one:
        assert torch.equal(res[k], one[k]), k
        if not k.endswith("attn.wk.bias"):  # exactly-zero true gradient: Adam amplifies float noise
            torch.testing.assert_close(fsdp[k], one[k], atol=1e-5, rtol=1e-5)
    state = json.loads((tmp_path / "res" / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["rollout"]["prompt_pos"] == 32 and state["rollout"]["iteration"] == 0
    m2 = {r["step"]: r for r in read_metrics(tmp_path / "fsdp") if "pg_loss" in r}
    for r in steps:
        assert m2[r["step"]]["reward_mean"] == r["reward_mean"]
        assert m2[r["step"]]["loss"] == pytest.approx(r["loss"], abs=1e-5)


def test_ppo_with_a_reward_model_minibatches_and_adaptive_kl(sft_init, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    from llm_dist.rl.tasks import AdditionTask

    pairs.write_text("".join(json.dumps(r) + "\n" for r in AdditionTask(level=1).preference_rows(64)))
    run_launcher(["launch/reward.py", f"reward.init_from={sft_init}", f"reward.data={pairs}", "train.max_steps=3",
                  "train.batch_size=8", "train.micro_batch_size=8", "train.dtype=fp32", "parallel.device=cpu",
                  "eval.interval=0", f"out_dir={tmp_path / 'rm'}"])
    run_launcher(_args(sft_init, tmp_path / "ppo", "train.max_steps=4", f"rl.reward_model={tmp_path / 'rm'}",
                       "ppo.num_minibatches=2", "ppo.epochs=1", "ppo.adaptive_kl=true", "ppo.kl_target=0.01",
                       "ppo.kl_horizon=100", "rl.eval_examples=0"))
    steps = [r for r in read_metrics(tmp_path / "ppo") if "pg_loss" in r]
    assert len(steps) == 4
    assert steps[0]["reward_mean"] == steps[1]["reward_mean"] != steps[2]["reward_mean"]  # 2 minibatches per rollout
    assert any(0 < r["reward_std"] for r in steps)  # real-valued scores from the reward model, not 0/1 only
    # the adaptive controller moved the coefficient after the first rollout: up if its KL exceeded the target
    k0, k1, kl0 = steps[0]["kl_coef"], steps[2]["kl_coef"], steps[0]["kl"]
    assert k0 == 0.1 and k1 == pytest.approx(0.1 * (1 + min(max(kl0 / 0.01 - 1, -0.2), 0.2) * 16 / 100))

    p = run_launcher(_args(sft_init, tmp_path / "bad", "ppo.num_minibatches=3"), check=False)
    assert p.returncode == 2 and "ppo.num_minibatches=3" in p.stderr and len(p.stderr.strip().splitlines()) == 1
