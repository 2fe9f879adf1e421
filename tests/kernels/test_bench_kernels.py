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
    assert {"fused_ms", "unfused_ms", "time_ratio"} <= res["cross_entropy"][0].keys()
    assert res["rmsnorm"][0]["fused_fwd_gbs"] > 0
