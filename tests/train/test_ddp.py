"""DDP under torchrun (2 processes, gloo) gives the parameters of a single process with the same global batch."""

from __future__ import annotations

from pathlib import Path

from llm_dist.checkpoint import find_latest, read_json
from tests.helpers import final_params, read_metrics, run_launcher


def test_two_rank_ddp_equals_single_process(tmp_path: Path, prepared_byte_data: Path) -> None:
    common = ["launch/pretrain.py", "--config", "configs/debug.yaml", f"data.dir={prepared_byte_data}",
              "train.max_steps=6", "train.batch_size=8", "train.micro_batch_size=2", "train.log_interval=1",
              "eval.interval=0", "eval.steps=2", "eval.sample_tokens=0", "checkpoint.interval=0",
              # No biases: the attention key bias has an identically zero true gradient (softmax ignores a
              # per-query constant), so its gradient is pure rounding noise, which Adam normalises into
              # lr-sized steps that differ between any two summation orders (seen: 1.3e-6 after 6 steps).
              "model.bias=false"]
    run_launcher([*common, f"out_dir={tmp_path / 'single'}"])  # 1 rank x 4 micro-batches
    run_launcher([*common, f"out_dir={tmp_path / 'ddp'}"], nproc=2)  # 2 ranks x 2 micro-batches, no_sync
    single, ddp = final_params(tmp_path / "single"), final_params(tmp_path / "ddp")
    assert single.keys() == ddp.keys()
    for k in single:
        diff = (single[k] - ddp[k]).abs().max().item()
        assert diff <= 1e-6, f"{k}: max |single - ddp| = {diff:.3e}"
    # The runs really trained (the comparison is not between two untouched inits) ...
    assert read_json(find_latest(str(tmp_path / "single" / "checkpoints")), "train_state.json")["trainer"]["step"] == 6
    # ... and both runs logged the same global losses (the loss is normalised by the global target count).
    l1 = [r["loss"] for r in read_metrics(tmp_path / "single") if "loss" in r]
    l2 = [r["loss"] for r in read_metrics(tmp_path / "ddp") if "loss" in r]
    assert len(l1) == len(l2) == 6
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-6
