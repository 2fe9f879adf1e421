"""A real pretraining run with evaluation every N steps (val loss / ppl / bpb, multiple choice), a sample logged as
text and a profiler window; then launch/evaluate.py on its checkpoint, in one process and on 2 ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.helpers import REPO, read_metrics, run_launcher

MC = REPO / "data" / "tinyshakespeare" / "mc_val.jsonl"


def test_pretrain_eval_profile_then_evaluate_cli(tmp_path: Path, prepared_byte_data: Path) -> None:
    run = tmp_path / "run"
    p = run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
                      f"out_dir={run}", "train.max_steps=8", "train.batch_size=8", "train.micro_batch_size=4",
                      "eval.interval=4", "eval.steps=2", f"eval.mc_data={MC}", "eval.mc_examples=24",
                      "eval.sample_tokens=16", "logging.tensorboard=true", "profile.enabled=true",
                      "profile.wait=1", "profile.warmup=1", "profile.active=2", "profile.trace=chrome"])
    recs = read_metrics(run)
    evals = [r for r in recs if "val/loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    for r in evals:
        assert math.isclose(r["val/bpb"], r["val/loss"] / math.log(2), rel_tol=1e-12)  # byte tokenizer
        assert math.isclose(r["val/ppl"], math.exp(r["val/loss"]), rel_tol=1e-12)
        assert r["mc/n"] == 24 and "mc/acc_norm" not in r  # the ambiguous name is gone
        assert all(0 <= r[k] <= 1 for k in ("mc/acc", "mc/acc_norm_tokens", "mc/acc_norm_chars"))
    samples = [r for r in recs if "sample" in r]
    assert len(samples) == 1 and samples[0]["step"] == 8 and samples[0]["sample"] in p.stdout
    # Profiler: a trace for the window and the top-kernels table at the end.
    assert (run / "profile" / "trace_rank0.json").is_file()
    assert "profile of steps 3-4 (sorted by self_cpu_time_total)" in p.stdout and "aten::" in p.stdout
    # Logging backends: a missing/failed optional backend warns at most once and the run finishes.
    assert p.stderr.count("TensorBoard disabled") <= 1

    # The evaluation CLI on the final checkpoint: the same global batches (8 sequences, 2 steps) as the
    # in-training evaluation at step 8 give the same loss; 2 ranks give the same figures as 1.
    common = ["launch/evaluate.py", "--checkpoint", str(run), "--data-dir", str(prepared_byte_data), "--steps", "2",
              "--mc", str(MC), "--mc-examples", "24"]
    run_launcher([*common, "--batch-size", "8", "--out", str(tmp_path / "one.json")])
    run_launcher([*common, "--batch-size", "4", "--out", str(tmp_path / "two.json")], nproc=2)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert math.isclose(one["val/loss"], evals[-1]["val/loss"], rel_tol=1e-6)
    assert all(one[k] == evals[-1][k] for k in ("mc/acc", "mc/acc_norm_tokens", "mc/acc_norm_chars"))
    assert one["mc/chance"] == 0.25
    for k in ("val/loss", "val/bpb", "val/ppl"):
        assert math.isclose(one[k], two[k], rel_tol=1e-9), k
    for k in ("mc/acc", "mc/acc_norm_tokens", "mc/acc_norm_chars", "mc/n", "val/tokens", "val/bytes"):
        assert one[k] == two[k], k


def test_bad_mc_file_is_a_one_line_config_error(tmp_path: Path, prepared_byte_data: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "endings": ["b", "c"], "label": 5}\n')
    p = run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
                      f"out_dir={tmp_path / 'run'}", f"eval.mc_data={bad}"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: eval.mc_data: {bad}:1: 'label' must be an integer index into the 2 endings, got 5")
