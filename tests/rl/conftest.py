"""A briefly SFT-ed byte-level policy shared by the RL stage tests (GRPO, PPO, reward model)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_launcher


@pytest.fixture(scope="session")
def sft_init(tmp_path_factory):
    """A briefly SFT-ed policy on 1-digit addition (so some samples earn reward and advantages are non-zero)."""
    from llm_dist.rl.tasks import AdditionTask

    d = tmp_path_factory.mktemp("rl")
    rows = AdditionTask(level=1).sft_rows(200)
    (d / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_launcher(["launch/sft.py", "model.preset=debug", "model.block_size=32", "tokenizer.name=byte",
                  f"sft.data={d / 'add.jsonl'}", "sft.eval_examples=0", "train.batch_size=16",
                  "train.micro_batch_size=16", "train.max_steps=100", "train.dtype=fp32", "optim.lr=3e-3",
                  "optim.warmup_steps=2", "parallel.device=cpu", "eval.interval=0", f"out_dir={d / 'sft'}"])
    return d / "sft"
