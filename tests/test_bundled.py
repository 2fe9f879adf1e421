"""llm_dist/bundled.py: shipped configs and data found by their checkout paths from any directory, and the
pyproject's package-data globs cover every shipped file (a new config must not silently miss the wheel)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

from llm_dist.bundled import ASSETS_DIR, CONFIGS_DIR, PACKAGE_DIR, bundled_path, config_file, shipped_configs
from llm_dist.config import ConfigError, parse_args
from llm_dist.stages import resolve_path
from tests.helpers import REPO


@pytest.mark.parametrize("name", ["debug", "debug.yaml", "configs/debug.yaml", "./configs/debug.yaml"])
def test_config_by_name_from_another_directory(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Path(config_file(name)) == CONFIGS_DIR / "debug.yaml"
    assert parse_args(["--config", name]).out_dir == "runs/debug"


def test_a_file_on_disk_wins_and_unknown_names_are_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "debug.yaml").write_text("out_dir: mine\n")
    assert config_file("debug.yaml") == "debug.yaml" and parse_args(["--config", "debug.yaml"]).out_dir == "mine"
    assert config_file("debug") == str(CONFIGS_DIR / "debug.yaml")  # a name without the suffix is not the file
    assert config_file("../llm_dist/configs/debug") == "../llm_dist/configs/debug"  # no escaping the folder
    with pytest.raises(ConfigError, match=r"config file nosuch: not found \(shipped configs: .*debug, .*gpt2_124m"):
        parse_args(["--config", "nosuch"])
    assert "ablations/base" in shipped_configs()


def test_data_paths_resolve_to_the_package_copies(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert bundled_path("data/tinyshakespeare/input.txt") == ASSETS_DIR / "tinyshakespeare" / "input.txt"
    assert bundled_path("./data/gpt2_bpe") == ASSETS_DIR / "gpt2_bpe"
    assert bundled_path("data/tinyshakespeare/nosuch.txt") is None and bundled_path("data/gsm8k/train.jsonl") is None
    assert Path(resolve_path("data/tinyshakespeare/input.txt")).samefile(ASSETS_DIR / "tinyshakespeare" / "input.txt")
    assert resolve_path("data/nosuch/x.txt") == "data/nosuch/x.txt"  # left for the caller's own error


def test_checkout_paths_are_the_package_files() -> None:
    """configs/, data/gpt2_bpe and data/tinyshakespeare are symlinks: one copy of each file in git."""
    for link, target in (("configs", CONFIGS_DIR), ("data/gpt2_bpe", ASSETS_DIR / "gpt2_bpe"),
                         ("data/tinyshakespeare", ASSETS_DIR / "tinyshakespeare")):
        assert (REPO / link).is_symlink() and (REPO / link).resolve() == target.resolve(), link


def test_package_data_globs_cover_every_shipped_file() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llm_dist"]
    shipped = [p for d in (CONFIGS_DIR, ASSETS_DIR) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(shipped) >= 15
    for p in shipped:
        rel = p.relative_to(PACKAGE_DIR).as_posix()
        # setuptools globs: `*` does not cross a `/`
        assert any(fnmatch.fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in patterns), rel
