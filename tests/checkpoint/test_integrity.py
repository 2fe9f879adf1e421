"""Checkpoint integrity: block CRCs recorded at save and checked at load, NaN/Inf refused, pruning that never
deletes what it did not write and verify, failed writes (a full disk) that remove the partial and say so."""

from __future__ import annotations

import errno
import json
import os
import traceback
import zlib
from pathlib import Path

import fsspec
import pytest
import torch

from llm_dist.checkpoint import CheckpointManager, find_latest, list_checkpoints, load_checkpoint, verify
from llm_dist.checkpoint import integrity, manager, sharded
from llm_dist.checkpoint.manager import CheckpointWriteError, load_checkpoint_weights
from llm_dist.checkpoint.sharded import CheckpointReadError
from llm_dist.model.transformer import build_model
from llm_dist.tokenizer import ByteTokenizer
from tests.checkpoint.tiny import TINY_MODEL, tiny_model_opt


def _save(mgr: CheckpointManager, step: int, model, opt) -> str:
    return mgr.save(step, sharded.model_optim_state(model, opt), {"trainer": {"step": step}}, "out_dir: x\n",
                    ByteTokenizer(), "byte")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """Same size, different bytes: what the size check alone let through."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    assert path.stat().st_size == size


# -- the checksums themselves ----------------------------------------------------------------------------


def test_block_crcs_match_zlib_and_parallel_equals_serial(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    fs = fsspec.filesystem("file")
    got = integrity.file_checksums(fs, {"f": str(tmp_path / "f")}, block_bytes=3000, workers=4)["f"]
    want = [f"{zlib.crc32(data[i:i + 3000]) & 0xFFFFFFFF:08x}" for i in range(0, 10_000, 3000)]
    assert got == want == integrity.crc_bytes(data, 3000) and len(got) == 4
    (tmp_path / "empty").write_bytes(b"")
    assert integrity.file_checksums(fs, {"e": str(tmp_path / "empty")})["e"] == integrity.crc_bytes(b"")


def test_following_a_growing_file_gives_the_finished_files_crcs(tmp_path: Path) -> None:
    """The hasher that follows DCP's writer reads each file while it grows; its blocks must equal those of
    the finished file, whatever the write sizes and block boundaries."""
    import threading
    import time

    data = {"__0_0.distcp": os.urandom(25_000), "__0_1.distcp": os.urandom(4_000), "__0_2.distcp": b""}
    follower = integrity.FollowingChecksums(str(tmp_path), "__0_", block_bytes=3000, poll_s=0.001).start()
    (tmp_path / "__1_0.distcp").write_bytes(b"another rank's file")  # not this prefix: ignored

    def write() -> None:
        for name, blob in data.items():
            with open(tmp_path / name, "wb") as f:
                for i in range(0, len(blob), 777):
                    f.write(blob[i:i + 777])
                    f.flush()
                    time.sleep(0.0005)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    got = follower.finish(sorted(data))
    fs = fsspec.filesystem("file")
    want = integrity.file_checksums(fs, {n: str(tmp_path / n) for n in data}, block_bytes=3000)
    assert got == want and len(got["__0_0.distcp"]) == 9 and got["__0_2.distcp"] == integrity.crc_bytes(b"")


def test_following_restarts_on_a_stale_file_rewritten_or_replaced(tmp_path: Path) -> None:
    """A stale shard left by a crashed save (node-local storage, where rank 0 cannot clean it) that the writer
    truncates, or replaces, must not leave its old bytes in the recorded CRCs."""
    (tmp_path / "__0_0.distcp").write_bytes(os.urandom(5000))
    (tmp_path / "__0_1.distcp").write_bytes(os.urandom(5000))
    (tmp_path / "__0_2.distcp").write_bytes(os.urandom(2000))
    follower = integrity.FollowingChecksums(str(tmp_path), "__0_", block_bytes=3000, poll_s=0.001).start()
    import time

    time.sleep(0.05)  # the follower has read the stale bytes
    new = {"__0_0.distcp": os.urandom(4000), "__0_1.distcp": os.urandom(3500), "__0_2.distcp": os.urandom(7000)}
    (tmp_path / "__0_0.distcp").write_bytes(new["__0_0.distcp"])  # truncated in place, shorter
    (tmp_path / "__0_1.distcp").unlink()
    (tmp_path / "__0_1.distcp").write_bytes(new["__0_1.distcp"])  # a new file under the old name
    with open(tmp_path / "__0_2.distcp", "wb") as f:  # truncated in place, then longer than before
        for i in range(0, 7000, 500):
            f.write(new["__0_2.distcp"][i:i + 500])
            f.flush()
            time.sleep(0.002)
    got = follower.finish(sorted(new))
    assert got == {name: integrity.crc_bytes(data, 3000) for name, data in new.items()}


@pytest.mark.parametrize("async_save", [False, True])
def test_every_file_of_a_checkpoint_has_its_checksums(tmp_path: Path, async_save: bool) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path), async_save=async_save)
    url = _save(mgr, 3, model, opt)
    mgr.close()
    meta = json.loads((Path(url) / "meta.json").read_text())
    assert set(meta["checksums"]["files"]) == set(meta["files"])  # shards, metadata, RNG, JSON, YAML
    assert not (Path(url) / integrity.SUMS_DIR).exists()  # per-rank sums folded into meta.json
    fs = fsspec.filesystem("file")
    for rel, crcs in meta["checksums"]["files"].items():  # what was recorded is what is on disk
        assert integrity.file_checksums(fs, {rel: str(Path(url) / rel)})[rel] == crcs
    assert verify(url, checksums=True) is None


def test_same_size_overwrite_is_caught_and_named(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    url = _save(CheckpointManager(str(tmp_path)), 3, model, opt)
    shard = next((Path(url) / "dcp").glob("*.distcp"))
    _overwrite(shard, 1000, b"\xff" * 4096)
    assert verify(url) is None  # sizes alone: passes (the old hole)
    problem = verify(url, checksums=True)
    assert problem is not None and f"dcp/{shard.name}: checksum mismatch in bytes 0-" in problem
    model2, opt2 = tiny_model_opt(1)
    with pytest.raises(CheckpointReadError, match="checksum mismatch"):
        load_checkpoint(url, model2, opt2)
    with pytest.raises(CheckpointReadError, match="checksum mismatch"):
        load_checkpoint_weights(build_model(TINY_MODEL, "cpu"), url)


def test_checksums_off_writes_none_and_old_checkpoints_still_load(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    url = _save(CheckpointManager(str(tmp_path), checksums=False), 3, model, opt)
    meta = json.loads((Path(url) / "meta.json").read_text())
    assert "checksums" not in meta and verify(url, checksums=True) is None  # nothing recorded, sizes checked
    model2, opt2 = tiny_model_opt(1)
    load_checkpoint(url, model2, opt2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_non_finite_state_is_refused_by_name(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    with torch.no_grad():
        model.blocks[1].mlp.up.weight[0, 0] = float("nan")
    url = _save(CheckpointManager(str(tmp_path)), 3, model, opt)  # checksums valid: the values are the problem
    model2, opt2 = tiny_model_opt(1)
    with pytest.raises(CheckpointReadError, match=r"blocks\.1\.mlp\.up\.weight holds NaN/Inf"):
        load_checkpoint(url, model2, opt2)
    with pytest.raises(CheckpointReadError, match="NaN/Inf"):
        load_checkpoint_weights(build_model(TINY_MODEL, "cpu"), url)


def test_nonfinite_tensor_walks_nested_state() -> None:
    assert manager.nonfinite_tensor({"a": {"b": [torch.ones(2), torch.tensor([1.0, float("inf")])]}}) == "a.b.1"
    assert manager.nonfinite_tensor({"a": torch.tensor([1, 2]), "b": torch.zeros(3)}) is None  # ints are fine
    big = torch.full((4,), 3e38)  # finite values whose sum overflows: not a false alarm
    assert not torch.isfinite(big.sum()) and manager.nonfinite_tensor({"w": big}) is None
    assert manager.nonfinite_tensor({"w": torch.tensor([float("inf"), float("-inf")])}) == "w"  # sum is NaN


# -- pruning ---------------------------------------------------------------------------------------------


def test_prune_never_counts_or_deletes_what_it_did_not_write(tmp_path: Path) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path), keep_last_k=2)
    s1 = _save(mgr, 1, model, opt)
    stray = tmp_path / "step_00000099"  # a stray directory holding only a marker, newer than everything
    stray.mkdir()
    (stray / "COMPLETE").write_text("99\n")
    user = tmp_path / "step_abc"  # a user's directory
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "step_00000000.tmp").mkdir()  # this format's partial write, older than the next save
    (tmp_path / "README").write_text("not a checkpoint")
    s2 = _save(mgr, 2, model, opt)
    s3 = _save(mgr, 3, model, opt)
    complete, _ = list_checkpoints(str(tmp_path))
    names = {Path(u).name for u in complete}
    # keep_last_k=2 counts only verified checkpoints: step 1 goes, 2 and 3 stay; the stray counted for nothing
    assert names == {"step_00000002", "step_00000003", "step_00000099"}
    assert not Path(s1).exists() and Path(s2).exists() and Path(s3).exists()
    assert (stray / "COMPLETE").exists() and (user / "notes.txt").read_text() == "mine"
    assert (tmp_path / "README").exists() and not (tmp_path / "step_00000000.tmp").exists()
    assert find_latest(str(tmp_path), report=False) == s3  # the stray does not verify: never loaded


def test_no_prune_when_the_new_checkpoint_does_not_verify(tmp_path: Path, monkeypatch) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path), keep_last_k=1)
    s1 = _save(mgr, 1, model, opt)
    real_verify = manager.verify
    monkeypatch.setattr(manager, "verify", lambda url, checksums=False: (
        "checkpoint step_2: damaged" if url.endswith("step_00000002") else real_verify(url, checksums)))
    _save(mgr, 2, model, opt)
    assert Path(s1).exists() and real_verify(s1) is None  # the good one survives a bad new one


# -- failed writes ---------------------------------------------------------------------------------------


def test_full_disk_in_a_small_file_removes_the_partial(tmp_path: Path, monkeypatch) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path))
    s1 = _save(mgr, 1, model, opt)
    before = _tree_bytes(tmp_path)
    real = manager._write_bytes

    def full(fs, path, data):  # noqa: ANN001
        if path.endswith("train_state.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fs, path, data)

    monkeypatch.setattr(manager, "_write_bytes", full)
    with pytest.raises(CheckpointWriteError) as e:
        _save(mgr, 2, model, opt)
    assert str(e.value) == f"no space left on device writing {tmp_path}/step_00000002.tmp; step_00000001 is intact"
    assert _tree_bytes(tmp_path) == before and verify(s1, checksums=True) is None


def test_full_disk_inside_dcp_removes_the_partial(tmp_path: Path, monkeypatch) -> None:
    """DCP wraps each rank's error in a CheckpointException (a BaseException); torch.save's zip writer reports
    ENOSPC as 'unexpected pos', with the OSError underneath. Both must come out as one line."""
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path))
    _save(mgr, 1, model, opt)
    before = _tree_bytes(tmp_path)
    from torch.distributed.checkpoint.api import CheckpointException

    def failing_save(state, path, **kwargs):  # noqa: ANN001, ANN003
        Path(path).mkdir(parents=True)
        (Path(path) / "__0_0.distcp").write_bytes(b"partial")
        try:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        except RuntimeError as inner:
            # as DCP's _wrap_exception records it: (exception, traceback)
            raise CheckpointException("write", {0: (inner, traceback.extract_tb(inner.__traceback__))}) from None

    monkeypatch.setattr(sharded, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=r"^no space left on device writing .*step_00000002\.tmp; "
                                                    r"step_00000001 is intact$"):
        _save(mgr, 2, model, opt)
    assert _tree_bytes(tmp_path) == before


def test_other_write_failures_are_one_line_too(tmp_path: Path, monkeypatch) -> None:
    model, opt = tiny_model_opt(0)
    mgr = CheckpointManager(str(tmp_path))

    def denied(state, path, **kwargs):  # noqa: ANN001, ANN003
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(sharded, "save", denied)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint write failed in .*step_00000001\.tmp "
                                                    r"\(PermissionError: .*\); no earlier checkpoint exists"):
        _save(mgr, 1, model, opt)
    assert list(tmp_path.iterdir()) == []
