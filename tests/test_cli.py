"""llm_dist/cli.py: the exit code every process reports through $LLM_DIST_EXIT_FILE (read by slurm/common.sh)."""

from __future__ import annotations

import pytest

from llm_dist.cli import run


@pytest.mark.parametrize("stage_rc", [0, 75, 3])
def test_exit_code_written_to_the_exit_file(tmp_path, monkeypatch, stage_rc):
    f = tmp_path / "sub" / "exit"
    monkeypatch.setenv("LLM_DIST_EXIT_FILE", str(f))
    assert run(lambda cfg: stage_rc, ["train.max_steps=1"]) == stage_rc
    assert f.read_text() == f"{stage_rc}\n"
    assert [p.name for p in f.parent.iterdir()] == ["exit"]  # no temporary file left behind


def test_config_error_written_to_the_exit_file(tmp_path, monkeypatch, capsys):
    f = tmp_path / "exit"
    monkeypatch.setenv("LLM_DIST_EXIT_FILE", str(f))
    assert run(lambda cfg: 0, ["optim.lrr=1"]) == 2
    assert f.read_text() == "2\n" and "optim.lrr" in capsys.readouterr().err


def test_no_exit_file_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_DIST_EXIT_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run(lambda cfg: 0, ["train.max_steps=1"]) == 0
    assert list(tmp_path.iterdir()) == []
