"""Sharded checkpoints in one process: round trip, crash safety, pruning, async, fsspec URLs, safe loading."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_dist.checkpoint import (CheckpointManager, find_latest, get_rng_state, list_checkpoints, load_checkpoint,
                                 load_checkpoint_tokenizer, set_rng_state, verify)
from llm_dist.checkpoint import sharded
from llm_dist.tokenizer import ByteTokenizer
from tests.checkpoint.tiny import tiny_model_opt


def _save(mgr: CheckpointManager, step: int, model, opt) -> str:
    return mgr.save(step, sharded.model_optim_state(model, opt), {"trainer": {"step": step}, "loader": {"index": step}},
                    "out_dir: x\n", ByteTokenizer(), "byte")


def test_round_trip_restores_model_optimizer_and_state(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    url = _save(CheckpointManager(str(tmp_path)), 7, model, opt)
    assert Path(url).name == "step_00000007" and (Path(url) / "COMPLETE").is_file()
    assert verify(url) is None and not list(tmp_path.glob("*.tmp"))
    model2, opt2 = tiny_model_opt(1)
    ck = load_checkpoint(url, model2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert model2.lm_head.weight is model2.tok_emb.weight  # tying survives the load
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert ck["train_state"] == {"trainer": {"step": 7}, "loader": {"index": 7}}
    assert ck["meta"]["step"] == 7 and "dcp/.metadata.json" in ck["meta"]["files"] and ck["rng"] is not None
    assert "dcp/.metadata" not in ck["meta"]["files"]  # the index is JSON: no pickle is written
    assert load_checkpoint_tokenizer(url).fingerprint() == ByteTokenizer().fingerprint()


def test_incomplete_and_truncated_checkpoints_are_skipped(tmp_path: Path, capsys) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path), keep_last_k=0)
    good = _save(mgr, 1, model, opt)
    newer = _save(mgr, 2, model, opt)
    (tmp_path / "step_00000003.tmp").mkdir()  # a crash mid-write
    crashed = tmp_path / "step_00000004"  # renamed but the marker never written
    crashed.mkdir()
    assert find_latest(str(tmp_path)) == newer
    assert "step_00000004 is incomplete" in capsys.readouterr().err
    # Truncate one shard of the newest complete checkpoint: reported by name, the older one is used.
    shard = next((Path(newer) / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert "expected" in verify(newer) and shard.name in verify(newer)
    assert find_latest(str(tmp_path)) == good
    assert f"{shard.name}: 100 bytes" in capsys.readouterr().err


def test_crash_during_write_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path), keep_last_k=1)
    first = _save(mgr, 10, model, opt)
    before = {p: p.read_bytes() for p in Path(first).rglob("*") if p.is_file()}

    def dies(state, path, **kw):  # the process "dies" after writing part of the shards
        Path(path).mkdir(parents=True)
        (Path(path) / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(sharded, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        _save(mgr, 20, model, opt)
    monkeypatch.undo()
    assert find_latest(str(tmp_path)) == first
    assert {p: p.read_bytes() for p in Path(first).rglob("*") if p.is_file()} == before  # untouched
    assert (tmp_path / "step_00000020.tmp").is_dir()
    # The next successful save of that step replaces the leftover, and keep_last_k=1 never left us empty.
    assert Path(_save(mgr, 20, model, opt)).name == "step_00000020"
    assert [Path(u).name for u in list_checkpoints(str(tmp_path))[0]] == ["step_00000020"]


def test_keep_last_k_and_covered_incomplete_dirs(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path), keep_last_k=2)
    _save(mgr, 10, model, opt)
    (tmp_path / "step_00000015.tmp").mkdir()  # older than the next complete one: covered, removed
    for s in (20, 30):
        _save(mgr, s, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]


def test_async_save_finalises_in_the_background(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    url = _save(mgr, 5, model, opt)
    # Training goes on: forward/backward may run during the copy; before the next optimizer step (the
    # first change to the saved tensors) the trainer waits for the copy, then the write continues.
    mgr.wait_staged()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mgr.wait()
    assert verify(url) is None
    fresh, fresh_opt = tiny_model_opt(0)  # same seed, same single step: the state that was saved
    model2, opt2 = tiny_model_opt(3)
    load_checkpoint(url, model2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model2.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    mgr.save(6, sharded.model_optim_state(model, opt), {}, "x: 1\n", ByteTokenizer(), "byte")
    mgr.close()
    assert [Path(u).name for u in list_checkpoints(str(tmp_path))[0]] == ["step_00000005", "step_00000006"]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_fsspec_urls(tmp_path: Path, scheme: str) -> None:
    model, opt = tiny_model_opt(0)
    root = f"file://{tmp_path}/ck" if scheme == "file" else "memory://llm_dist_test/ck"
    url = _save(CheckpointManager(root), 3, model, opt)
    assert url.startswith(f"{scheme}://") and find_latest(root) == url
    model2, opt2 = tiny_model_opt(1)
    load_checkpoint(url, model2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_tampered_metadata_is_refused_not_executed(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    url = _save(CheckpointManager(str(tmp_path)), 1, model, opt)
    (Path(url) / "dcp" / ".metadata.json").unlink()  # now looks like a legacy checkpoint with a pickled index
    (Path(url) / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    model2, opt2 = tiny_model_opt(1)
    with pytest.raises(sharded.UnsafeCheckpointError,
                       match=r"step_00000001/dcp/\.metadata: refers to (posix|os)\.system, which a checkpoint may not"):
        load_checkpoint(url, model2, opt2)


def test_rng_state_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = get_rng_state()
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    torch.save(state, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


@pytest.mark.parametrize("legacy", [False, True])
def test_tokenizer_files_have_the_project_name_and_legacy_names_still_load(tmp_path: Path, monkeypatch,
                                                                           legacy: bool) -> None:
    """The tokenizer record and stored BPE are llm_dist_tokenizer*.json (HF's tokenizer.json is a different
    format); a checkpoint written before the rename (tokenizer.json + tokenizer.bpe.json) still loads."""
    from llm_dist.checkpoint import manager
    from llm_dist.tokenizer import BPETokenizer

    tok = BPETokenizer("b", r"\S+|\s+", {bytes([b]): b for b in range(256)} | {b"ab": 256}, {"<|endoftext|>": 257})
    if legacy:  # what the old writer produced: its names, in the files and in meta.json
        monkeypatch.setattr(manager, "TOKENIZER_RECORD", manager.LEGACY_TOKENIZER_RECORD)
        monkeypatch.setattr(manager, "TOKENIZER_FILE", manager.LEGACY_TOKENIZER_FILE)
    model, opt = tiny_model_opt(0)
    url = CheckpointManager(str(tmp_path)).save(1, sharded.model_optim_state(model, opt), {"trainer": {"step": 1}},
                                                "out_dir: x\n", tok, str(tmp_path / "tok.json"))
    monkeypatch.undo()
    names = {p.name for p in Path(url).iterdir()}
    want = {"tokenizer.json", "tokenizer.bpe.json"} if legacy else {"llm_dist_tokenizer.json", "llm_dist_tokenizer.bpe.json"}
    assert want <= names and not ({"tokenizer.json", "llm_dist_tokenizer.json"} - want) & names
    assert verify(url, checksums=True) is None
    assert load_checkpoint_tokenizer(url).fingerprint() == tok.fingerprint()
    assert load_checkpoint_tokenizer(url).encode_ordinary("abab a") == [256, 256, 32, 97]
