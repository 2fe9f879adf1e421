"""GRPO with LoRA on the SFT-ed policy: the policy starts as the base (ratio 1, KL 0 to the reference, which is
the base without adapters), only the adapters train, and the checkpoint holds them and the base's reference."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import final_params, read_metrics, run_launcher


def test_grpo_with_lora(sft_init, tmp_path):
    run_launcher(["launch/grpo.py", f"rl.init_from={sft_init}", "rl.task_level=1", "rl.group_size=4",
                  "rl.max_new_tokens=4", "rl.beta=0.05", "rl.eval_examples=0", "rl.temperature=1.5",
                  "train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=2", "train.dtype=fp32",
                  "train.log_interval=1", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-2",
                  "parallel.device=cpu", "eval.interval=0", "model.lora.rank=4", "model.lora.targets=wq,wv,wo",
                  f"out_dir={tmp_path}"])
    steps = [r for r in read_metrics(tmp_path) if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    meta = json.loads((tmp_path / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["lora_base"]["url"].startswith(str(sft_init))
    policy, base = final_params(tmp_path), final_params(sft_init)
    for k, v in base.items():
        assert torch.equal(policy[k], v), k  # the base is frozen (same vocabulary: the SFT run added the chat tokens)
    assert any(policy[k].abs().max() > 0 for k in policy if k.endswith("lora_B"))  # the adapters moved
