"""tools/bench_kernels.py: one clear line without a GPU; the interpreter smoke run produces every section's rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tests.kernels.kernel_helpers import needs_triton, quiet_interpreter

sys.path.insert(0, str(REPO / "tools"))
import bench_kernels  # noqa: E402

pytestmark = [needs_triton, quiet_interpreter]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_exits_2_with_one_line(capsys) -> None:
    assert bench_kernels.main(["--only", "attention"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


def test_unknown_section_is_one_line(capsys) -> None:
    assert bench_kernels.main(["--only", "attn"]) == 2
    assert "is not one of attention, cross_entropy, rmsnorm, e2e" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is for machines without a GPU")
def test_interpret_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench_kernels.main(["--interpret", "--only", "attention,cross_entropy,rmsnorm", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["attention"][0]["max_abs_err"] < 1e-5
    assert {"fused_ms", "unfused_ms", "time_ratio", "compiled_ms", "compiled_peak_mib", "time_vs_compiled",
            "mem_vs_compiled", "workspace_vs_compiled", "chunk"} <= res["cross_entropy"][0].keys()
    assert res["rmsnorm"][0]["fused_fwd_gbs"] > 0 and res["rmsnorm"][0]["rows_per_program_fwd"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is for machines without a GPU")
def test_attention_section_compares_flash_and_cudnn_and_times_first_calls(monkeypatch) -> None:
    """The GPU attention section at toy scale in the interpreter: cuDNN missing on a CPU is reported, not fatal."""
    import argparse

    monkeypatch.setattr(bench_kernels, "ATTN_HEADS", ((16, 2),))
    row = bench_kernels.bench_attention(argparse.Namespace(seq=[24], batch=1, repeats=1), "cpu")[0]
    assert row["cudnn_fwd_tflops"] is None and "cudnn_error" in row
    assert row["fwd_vs_best"] == row["fwd_ratio"] and row["new_length_tuned"] == 0
    assert row["first_call_s"] > 0 and row["new_length_s"] > 0
