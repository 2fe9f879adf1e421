"""llm_dist/api.py: a stage run in-process returns its run directory and final metrics (the README example)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llm_dist.api import RunResult, config, train
from llm_dist.config import ConfigError

TINY = ["train.max_steps=3", "train.log_interval=1", "checkpoint.interval=0", "eval.interval=3", "eval.steps=1",
        "eval.sample_tokens=0", "train.detect_anomaly=false"]


def test_train_returns_the_run_dir_and_the_last_metrics(tmp_path: Path, prepared_byte_data: Path) -> None:
    cfg = config("debug", [f"data.dir={prepared_byte_data}", f"out_dir={tmp_path / 'nb'}", *TINY])
    result = train(cfg)
    assert isinstance(result, RunResult) and result.exit_code == 0
    assert result.run_dir == tmp_path / "nb" and (result.run_dir / "checkpoints" / "step_00000003").is_dir()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if "loss" in r][-1]
    assert last_train["step"] == 3 and result.metrics["loss"] == last_train["loss"]
    assert result.metrics["val/loss"] == [r for r in records if "val/loss" in r][-1]["val/loss"]
    assert math.isfinite(result.metrics["loss"]) and result.metrics["eta_s"] == 0.0
    assert cfg.model.vocab_size == 0, "train() must not change the caller's Config"


def test_train_puts_back_the_torch_switches_a_stage_sets(tmp_path: Path, prepared_byte_data: Path) -> None:
    import torch

    before = (torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    # debug.yaml turns anomaly detection on; deterministic and a thread count are asked for explicitly
    train("debug", [f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}", "train.max_steps=1",
                    "eval.sample_tokens=0", "train.deterministic=true", "parallel.cpu_threads=1"])
    assert (torch.is_anomaly_enabled(), torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before


def test_train_from_a_name_with_overrides_and_its_errors(tmp_path: Path, prepared_byte_data: Path) -> None:
    result = train("configs/debug.yaml", [f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}", *TINY,
                                          "train.max_steps=1"])
    assert result.run_dir == tmp_path and result.metrics["loss"] > 0
    with pytest.raises(ValueError, match="stage 'generate': expected one of pretrain, sft"):
        train("debug", stage="generate")
    with pytest.raises(ConfigError, match="optim.lrr"):
        train("debug", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.micro_batch_size"):  # validated as the launcher validates
        train("debug", [f"out_dir={tmp_path}", "train.micro_batch_size=3"])


def test_the_readme_example_runs(tmp_path: Path, prepared_byte_data: Path, monkeypatch, capsys) -> None:
    """README's notebook snippet as written, with fewer steps and the session's prepared data appended."""
    import re

    import llm_dist.api as api
    from tests.helpers import REPO

    readme = (REPO / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "llm_dist.api" in b)
    real = api.config
    monkeypatch.setattr(api, "config", lambda name, overrides=(): real(name, [
        *overrides, "train.max_steps=2", "eval.sample_tokens=0", "checkpoint.interval=0", "eval.steps=1",
        f"data.dir={prepared_byte_data}"]))
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert printed[0] == "runs/notebook" and (tmp_path / "runs/notebook/checkpoints/step_00000002").is_dir()
    assert all(math.isfinite(float(v)) for v in printed[1:3])
