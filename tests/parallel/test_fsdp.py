"""FSDP2 and HSDP over 2 ranks (gloo, fp32) train to the single-process parameters, with and without AC."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import final_params, read_metrics, run_launcher

COMMON = ["launch/pretrain.py", "--config", "configs/debug.yaml", "train.max_steps=6", "train.batch_size=8",
          "train.micro_batch_size=2", "train.log_interval=1", "eval.interval=0", "eval.steps=2",
          "eval.sample_tokens=0", "checkpoint.interval=0",
          # No biases: the attention key bias has an identically zero true gradient, pure rounding noise
          # that Adam turns into lr-sized steps differing between summation orders (see test_ddp.py).
          "model.bias=false", "model.n_kv_head=2"]


def _losses(run: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, prepared_byte_data: Path) -> Path:
    out = tmp_path_factory.mktemp("single")
    run_launcher([*COMMON, f"data.dir={prepared_byte_data}", f"out_dir={out}"])
    return out


@pytest.mark.parametrize("extra", [
    ["parallel.strategy=fsdp"],
    ["parallel.strategy=fsdp", "parallel.ac=full", "parallel.reshard_after_forward=false"],
    ["parallel.strategy=hsdp", "parallel.hsdp_replicas=2"],  # 2 replicas x 1 shard: the HSDP mesh shape
    ["parallel.strategy=fsdp", "parallel.ac=selective", "parallel.ac_selective=op"],
], ids=["fsdp", "fsdp-ac-full", "hsdp", "fsdp-ac-op"])
def test_sharded_run_equals_single_process(tmp_path: Path, prepared_byte_data: Path, single_run: Path,
                                           extra: list[str]) -> None:
    p = run_launcher([*COMMON, f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}", *extra], nproc=2)
    strategy = extra[0].split("=")[1]
    assert f"strategy {strategy}" in p.stdout
    ref, got = final_params(single_run), final_params(tmp_path)
    assert ref.keys() == got.keys()
    for k in ref:
        diff = (ref[k] - got[k]).abs().max().item()
        assert diff <= 1e-5, f"{k}: max |single - {strategy}| = {diff:.2e}"
    # Loss and the clipped-gradient norm of every step: the sharded norm is the unsharded one.
    for (l1, g1), (l2, g2) in zip(_losses(single_run), _losses(tmp_path), strict=True):
        assert abs(l1 - l2) <= 1e-5 * abs(l1) and abs(g1 - g2) <= 1e-5 * abs(g1)


@pytest.mark.slow
def test_fsdp_with_ac_and_compile_equals_single_process(tmp_path: Path, prepared_byte_data: Path, single_run: Path,
                                                         monkeypatch) -> None:
    """AC wrappers, per-block torch.compile and FSDP2 composed (cold compile: ~30 s on 2 cores)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    run_launcher([*COMMON, f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}", "parallel.strategy=fsdp",
                  "parallel.ac=full", "train.compile=true"], nproc=2)
    ref, got = final_params(single_run), final_params(tmp_path)
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k
    for (l1, _), (l2, _) in zip(_losses(single_run), _losses(tmp_path), strict=True):
        assert abs(l1 - l2) <= 1e-5 * abs(l1)
