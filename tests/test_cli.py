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


def test_llm_dist_command_lists_and_dispatches(capsys) -> None:
    """`llm-dist --help` lists every command; an unknown one is one line and exit 2; each target imports."""
    import sys

    from llm_dist.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS) and len(COMMANDS) >= 10
    assert main(["pretrian"]) == 2 and "unknown command 'pretrian'; expected one of pretrain," in capsys.readouterr().err
    assert main([]) == 2
    for name, cmd in COMMANDS.items():
        assert callable(cmd.load()) and cmd.kind in ("stage", "tool"), name
    argv = list(sys.argv)
    assert main(["checkpoint", "inspect", "/nonexistent/run"]) == 2  # a tool's own exit status comes through
    assert "llm-dist checkpoint" not in capsys.readouterr().err and sys.argv == argv


def test_launchers_are_the_commands_of_their_name() -> None:
    from llm_dist.cli import COMMANDS
    from tests.helpers import REPO

    for script in (REPO / "launch").glob("*.py"):
        assert f'run_command("{script.stem}")' in script.read_text() and script.stem in COMMANDS, script


def test_torchrun_module_form_runs_two_ranks(tmp_path, prepared_byte_data) -> None:
    """`torchrun -m llm_dist.cli pretrain ...`: the module form of the launchers, 2 ranks, 1 step."""
    import subprocess
    import sys

    from tests.helpers import REPO, cpu_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llm_dist.cli",
           "pretrain", "--config", "debug", f"data.dir={prepared_byte_data}", f"out_dir={tmp_path}",
           "train.max_steps=1", "eval.interval=0", "eval.sample_tokens=0", "checkpoint.interval=0"]
    p = subprocess.run(cmd, cwd=REPO, env=cpu_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "2 rank(s) on cpu" in p.stdout and "step 1/1 |" in p.stdout
    assert p.stdout.count("CPU threads per rank: 1 (OMP_NUM_THREADS=1)") == 1  # the exported value wins; said once
    assert (tmp_path / "checkpoints" / "step_00000001").is_dir()
