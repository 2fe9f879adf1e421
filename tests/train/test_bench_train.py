"""tools/bench_train.py on CPU: one tiny configuration end to end; its MFU uses the trainer's formula and peak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llm_dist.config import load_config
from llm_dist.model.transformer import Transformer
from tests.helpers import REPO, cpu_env, load_tool


@pytest.fixture(scope="module")
def bt():
    return load_tool("bench_train")


def test_overrides_map_the_sweep_axes(bt) -> None:
    a = bt.parse(["model.n_layer=3", "--batch", "4", "--seq", "32", "--worker-dir", "x", "--strategy", "fsdp",
                  "--ac", "selective", "--compile", "max-autotune", "--dtype", "bf16"])
    cfg = load_config(None, bt.config_overrides(a, world_size=2))
    assert (cfg.parallel.strategy, cfg.parallel.ac, cfg.train.dtype) == ("fsdp", "selective", "bf16")
    assert (cfg.train.compile, cfg.train.compile_mode) == (True, "max-autotune")
    assert (cfg.train.micro_batch_size, cfg.train.batch_size, cfg.model.block_size) == (4, 8, 32)
    assert cfg.model.n_layer == 3
    a.compile = "off"
    assert load_config(None, bt.config_overrides(a, 1)).train.compile is False


def test_cpu_run_reports_trainer_consistent_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "--batch", "2", "--seq", "32", "--steps", "3",
            "--warmup", "1", "--device", "cpu", "--cores", "1", "--peak-tflops", "0.5", "--dtypes", "fp32",
            "--acs", "none,full", "--out", str(out)]
    p = subprocess.run([sys.executable, "tools/bench_train.py", *args], cwd=REPO, env=cpu_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["strategy"], r["ac"], r["compile"], r["dtype"]) for r in rows] == [
        ("single", "none", "off", "fp32"), ("single", "full", "off", "fp32")]
    cfg = load_config(None, ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
                             "model.vocab_size=257"])
    expected_flops = Transformer(cfg.model).flops_per_token(32)
    for r in rows:
        assert r["flops_per_token"] == expected_flops
        # Throughput's identities: tokens per step = batch x seq, and MFU = tok/s x FLOPs/token / peak.
        assert r["tok_per_s"] * r["step_time_mean_s"] == pytest.approx(2 * 32, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tok_per_s"] * expected_flops / 0.5e12, rel=1e-12)
        assert r["peak_tflops_per_device"] == 0.5
    assert rows[0]["vs_first"] == 1.0
    assert "| single | full | off | fp32 |" in p.stdout


def test_a_failing_configuration_is_reported_not_fatal(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "tools/bench_train.py", "model.n_head=3", "model.n_embd=32", "--steps", "1",
                        "--warmup", "0", "--device", "cpu", "--cores", "1"], cwd=REPO, env=cpu_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "ConfigError: model.n_embd=32 must be divisible by model.n_head=3" in p.stdout
    assert "| single | none | off | auto | failed: exit 1" in p.stdout
