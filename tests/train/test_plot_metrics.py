"""tools/plot_metrics.py: reads runs' JSONL (torn last line, resumed steps), draws what is there, writes a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_tool

pytest.importorskip("matplotlib", reason="tools/plot_metrics.py needs matplotlib (the dev extra installs it)")


@pytest.fixture(scope="module")
def pm():
    return load_tool("plot_metrics")


def write_run(d: Path, records: list[dict], torn_tail: str = "") -> Path:
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)
    return d


def test_two_runs_plotted_with_their_own_values(tmp_path: Path, pm) -> None:
    a = write_run(tmp_path / "a", [
        {"step": 1, "loss": 5.0, "lr": 1e-4, "grad_norm": 2.0, "tok_per_s": 100.0, "mem_gib": 0.5},
        {"step": 2, "loss": 4.0, "lr": 2e-4, "grad_norm": 1.5, "tok_per_s": 110.0, "mem_gib": 0.5},
        {"step": 2, "val/loss": 4.2, "val/bpb": 6.1},
        {"step": 2, "sample": "text records are skipped"},
    ], torn_tail='{"step": 3, "loss"')  # killed mid-write
    b = write_run(tmp_path / "b", [
        {"step": 1, "loss": 6.0}, {"step": 2, "loss": 9.9}, {"step": 2, "loss": 5.5},  # resumed: step 2 again
    ])
    out = tmp_path / "cmp.png"
    runs = [("a", pm.read_run(a)), ("b", pm.read_run(b))]
    drawn = pm.plot(runs, ["loss", "lr", "val/bpb", "mc/acc"], out)
    assert drawn["loss"] == {"a loss": ([1, 2], [5.0, 4.0]), "a val/loss": ([2], [4.2]), "b loss": ([1, 2], [6.0, 5.5])}
    assert drawn["lr"] == {"a lr": ([1, 2], [1e-4, 2e-4])}
    assert drawn["val/bpb"] == {"a val/bpb": ([2], [6.1])}
    assert "mc/acc" not in drawn  # no data in any run: no empty panel
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_and_errors(tmp_path: Path, pm, capsys: pytest.CaptureFixture) -> None:
    run = write_run(tmp_path / "r", [{"step": i, "loss": 5.0 - i / 10} for i in range(1, 30)])
    assert pm.main([str(run), "--smooth", "5"]) == 0
    assert (run / "metrics.png").is_file()
    assert pm.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert pm.main([str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl there" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad", [{"step": 1, "loss": 1.0}], torn_tail="not json\n{\"step\": 2}\n")
    assert pm.main([str(bad)]) == 2
    assert "metrics.jsonl:2: not valid JSON" in capsys.readouterr().err
