"""Atomic checkpoints: completeness marker, pruning, corrupt files, RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_dist.checkpoint import (CheckpointManager, find_latest, get_rng_state, load_checkpoint,
                                 load_checkpoint_tokenizer, set_rng_state)
from llm_dist.tokenizer import ByteTokenizer


def _save(mgr: CheckpointManager, step: int, value: float = 0.0) -> Path:
    return mgr.save(step, {"w": torch.full((3,), value), "step": step}, "out_dir: x\n", ByteTokenizer(), "byte")


def test_save_load_round_trip(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ck", keep_last_k=0)
    path = _save(mgr, 7, 1.5)
    assert path.name == "step_00000007" and (path / "COMPLETE").is_file() and not list(tmp_path.glob("ck/*.tmp"))
    ck = load_checkpoint(path)
    assert ck["state"]["step"] == 7 and torch.equal(ck["state"]["w"], torch.full((3,), 1.5))
    assert ck["meta"]["step"] == 7 and "state.pt" in ck["meta"]["files"] and ck["rng"] is not None
    assert load_checkpoint_tokenizer(path).fingerprint() == ByteTokenizer().fingerprint()
    assert (path / "config.yaml").read_text() == "out_dir: x\n"


def test_incomplete_checkpoints_are_skipped_and_refused(tmp_path: Path, capsys) -> None:
    mgr = CheckpointManager(tmp_path, keep_last_k=0)
    _save(mgr, 1)
    good = _save(mgr, 2)
    # A crash mid-write leaves a .tmp dir, and a dir whose marker never got written.
    (tmp_path / "step_00000003.tmp").mkdir()
    crashed = tmp_path / "step_00000004"
    crashed.mkdir()
    (crashed / "state.pt").write_bytes(b"partial")
    assert find_latest(tmp_path) == good
    assert "step_00000004 is incomplete" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="incomplete"):
        load_checkpoint(crashed)
    # Saving that step again replaces the leftover.
    _save(mgr, 3)
    assert find_latest(tmp_path).name == "step_00000003" and not (tmp_path / "step_00000003.tmp").exists()


def test_corrupt_state_names_the_file(tmp_path: Path) -> None:
    path = _save(CheckpointManager(tmp_path), 5)
    data = (path / "state.pt").read_bytes()
    (path / "state.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(RuntimeError, match=r"step_00000005/state.pt: cannot be read"):
        load_checkpoint(path)


def test_keep_last_k(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last_k=2)
    for s in (10, 20, 30, 40):
        _save(mgr, s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000030", "step_00000040"]
    one = CheckpointManager(tmp_path / "one", keep_last_k=1)
    _save(one, 1)
    _save(one, 2)
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["step_00000002"]


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    torch.save(state, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
