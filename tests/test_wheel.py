"""The wheel works without the checkout: built, installed into a fresh venv, run from another directory.

A non-editable install has no data/ or configs/ beside it, so this is what proves that the package carries
its files (llm_dist/bundled.py, pyproject [tool.setuptools.package-data]) and its `llm-dist` command.
The venv sees the system's torch etc. (--system-site-packages; the wheel is installed with --no-deps);
the check that `llm_dist` is imported from the venv, not from an editable checkout, is part of the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import REPO, cpu_env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with the wheel built from this checkout installed; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a copy: the build writes build/ and *.egg-info, which must not race the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "llm_dist", src / "llm_dist", ignore=shutil.ignore_patterns("__pycache__"))
    dist = root / "dist"
    env = _env()
    # Offline with the installed setuptools when it can build wheels itself (>= 70.1), else pip's isolated build.
    offline = importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *(["--no-build-isolation"] if offline else []),
                    "-q", "-w", str(dist), str(src)], check=True, env=env, cwd=root, capture_output=True, timeout=300)
    wheel = next(dist.glob("llm_dist-*.whl"))
    env_dir = root / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)  # the system's pip installs into it
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   env=env, cwd=root, capture_output=True, timeout=180)
    return env_dir / "bin"


def _env() -> dict[str, str]:
    env = cpu_env()
    env.pop("PYTHONPATH", None)  # nothing may point back at the checkout
    return env


def _run(bin_dir: Path, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def test_wheel_carries_its_files_and_runs_the_debug_config_from_elsewhere(installed: Path, tmp_path: Path) -> None:
    # One interpreter start for two checks: where llm_dist comes from, and the command list (`llm-dist --help`).
    out = _run(installed, ["python", "-c", "import llm_dist, llm_dist.cli as c; print(llm_dist.__file__); "
                                           "c.main(['--help'])"], tmp_path).stdout
    where = out.splitlines()[0].strip()
    assert Path(where).is_relative_to(installed.parent), f"llm_dist imported from {where}, not from the venv"
    site = Path(where).parent
    for f in ("configs/debug.yaml", "assets/gpt2_bpe/gpt2.tiktoken", "assets/gpt2_bpe/LICENSE.whisper-MIT",
              "assets/tinyshakespeare/input.txt", "assets/tinyshakespeare/README.md"):
        assert (site / f).is_file(), f"the wheel lacks llm_dist/{f}"
    for command in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo", "generate", "evaluate", "prepare", "tokenizer",
                    "checkpoint"):
        assert f"  {command} " in out, out
    assert (installed / "llm-dist").is_file()  # the console script; it runs the commands below

    # The debug config by name, GPT-2's BPE from the package, the default corpus (data.source) from the package.
    work = tmp_path / "elsewhere"
    work.mkdir()
    p = _run(installed, ["llm-dist", "pretrain", "--config", "debug", "tokenizer.name=gpt2", "train.max_steps=2",
                         "train.log_interval=1", "checkpoint.interval=2", "eval.interval=0", "eval.sample_tokens=0",
                         "train.detect_anomaly=false"], work)
    assert "step 2/2 |" in p.stdout, p.stdout
    run = work / "runs" / "debug"  # the config's out_dir, relative to where the command ran
    assert (run / "checkpoints" / "step_00000002").is_dir() and (work / "data" / "prepared").is_dir()
    index = json.loads((work / "data/prepared/shakespeare_byte/index.json").read_text())
    assert index["tokenizer"]["name"] == "gpt2"
    assert [Path(src["url"]) for src in index["recipe"]["sources"]] == [site / "assets/tinyshakespeare/input.txt"], index

    info = json.loads(_run(installed, ["llm-dist", "checkpoint", "inspect", str(run), "--json"], work).stdout)
    assert info["format"] == "dcp" and info["step"] == 2 and info["path"].endswith("step_00000002"), info
