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


def _leaf_fields(cls, prefix=""):
    """(dotted key, dataclass field, owning class) of every leaf of the config schema."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, cls


@pytest.mark.parametrize("launcher", ["pretrain", "sft", "reward", "ppo", "grpo", "dpo"])
def test_help_lists_every_key_with_default_and_comment(launcher, capsys, monkeypatch):
    """README: `launch/<stage>.py --help` prints every config key, its default and its one-line meaning."""
    import ast
    import inspect
    import runpy
    import sys

    from llm_dist.config import Config
    from tests.helpers import REPO

    script = str(REPO / "launch" / f"{launcher}.py")
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code in (0, None)
    lines = {line.split(" = ", 1)[0].strip(): line for line in capsys.readouterr().out.splitlines() if " = " in line}
    keys = list(_leaf_fields(Config))
    assert len(keys) > 150
    for key, f, cls in keys:
        assert key in lines, f"--help does not list {key}"
        value, _, comment = lines[key].split(" = ", 1)[1].partition(" # ")
        default = f.default if f.default is not dataclasses_missing() else f.default_factory()
        assert ast.literal_eval(value.strip()) == default, (key, value)
        src = next(line for line in inspect.getsource(cls).splitlines() if line.strip().startswith(f"{f.name}:"))
        assert comment.strip() and comment.strip() == src.split("#", 1)[1].strip(), key


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING
