"""What a run does with damaged, crafted or missing checkpoints, a full disk and a dead torchrun agent: the real
launcher in a subprocess, one line per event, and nothing good deleted or changed."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import psutil
import pytest

from llm_dist.checkpoint import verify
from tests.helpers import REPO, cpu_env, read_metrics, run_launcher

ARGS = ["launch/pretrain.py", "--config", "configs/debug.yaml", "train.log_interval=5", "eval.interval=0",
        "eval.steps=1", "eval.sample_tokens=0", "checkpoint.interval=5", "checkpoint.keep_last_k=0"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _err_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in p.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, prepared_byte_data: Path) -> Path:
    """A finished 10-step run with checkpoints at steps 5 and 10."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_launcher([*ARGS, f"data.dir={prepared_byte_data}", f"out_dir={out}", "train.max_steps=10"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]
    return out


def _copy(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def _rewrite(ckpt: Path, rel: str, data: bytes) -> None:
    """Replace a file *and* its recorded size and checksum in meta.json: damage that the integrity checks cannot
    see (or a crafted file), so what the file says must be refused on its own."""
    (ckpt / rel).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][rel] = len(data)
    meta["checksums"]["files"][rel] = [f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"]
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _flip(ckpt: Path) -> None:
    shard = next((ckpt / "dcp").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.seek(500)
        f.write(b"\xff" * 4096)


def _resume(run: Path, data: Path, *extra: str, steps: int = 12) -> subprocess.CompletedProcess:
    return run_launcher([*ARGS, f"data.dir={data}", f"out_dir={run}", f"train.max_steps={steps}", *extra], check=False)


def test_a_damaged_newest_checkpoint_falls_back_in_one_line(base_run: Path, tmp_path: Path,
                                                            prepared_byte_data: Path) -> None:
    run = _copy(base_run, tmp_path)
    _flip(run / "checkpoints/step_00000010")
    p = _resume(run, prepared_byte_data)
    assert p.returncode == 0, p.stderr
    lines = _err_lines(p)
    assert len(lines) == 1 and "step_00000010/dcp/__0_0.distcp: checksum mismatch" in lines[0], lines
    assert "Traceback" not in p.stdout + p.stderr
    assert f"resumed from {run}/checkpoints/step_00000005 at step 5" in p.stdout
    assert verify(str(run / "checkpoints/step_00000005"), checksums=True) is None


def test_when_nothing_loads_the_run_stops_and_changes_nothing(base_run: Path, tmp_path: Path,
                                                              prepared_byte_data: Path) -> None:
    run = _copy(base_run, tmp_path)
    _flip(run / "checkpoints/step_00000010")
    _rewrite(run / "checkpoints/step_00000005", "config.yaml", b"model: [unclosed\n")
    before = _tree(run)
    p = _resume(run, prepared_byte_data)
    assert p.returncode == 2
    lines = _err_lines(p)
    assert len(lines) == 1 and "Traceback" not in p.stdout + p.stderr, p.stderr
    assert lines[0].startswith("error: checkpoint.resume=auto: no checkpoint in")
    assert "step_00000010: dcp/__0_0.distcp: checksum mismatch" in lines[0]
    assert "step_00000005: config.yaml: not a plain YAML mapping" in lines[0]
    assert "checkpoint.resume=never" in lines[0]
    assert _tree(run) == before  # no step_10 overwritten, nothing pruned, no metrics appended, no lock left
    # the explicit way to start over works
    p = _resume(run, prepared_byte_data, "checkpoint.resume=never", steps=2)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("rel,data,expect", [
    ("config.yaml", b"!!python/object/apply:os.system ['touch MARKER']\n", "config.yaml: not a plain YAML mapping"),
    ("llm_dist_tokenizer.json", b"\x00garbage{", "llm_dist_tokenizer.json: not valid JSON"),
    ("llm_dist_tokenizer.json", json.dumps({"spec": "byte", "fingerprint": "x", "file": "../../etc/passwd"}).encode(),
     "'file' must be one of 'llm_dist_tokenizer.bpe.json', 'hf_tokenizer.json'"),
    ("train_state.json", b"[]", "train_state.json: expected a JSON object"),
])
def test_crafted_small_files_are_refused_by_name(base_run: Path, tmp_path: Path, prepared_byte_data: Path,
                                                 rel: str, data: bytes, expect: str) -> None:
    run = _copy(base_run, tmp_path)
    _rewrite(run / "checkpoints/step_00000010", rel, data)
    p = _resume(run, prepared_byte_data)
    assert p.returncode == 0, p.stderr
    lines = _err_lines(p)
    assert len(lines) == 1 and expect in lines[0] and "step_00000010" in lines[0], lines
    assert "resumed from" in p.stdout and "step_00000005 at step 5" in p.stdout
    assert not (REPO / "MARKER").exists() and not list(run.rglob("MARKER"))


def test_missing_dcp_metadata_is_one_line_not_a_traceback(base_run: Path, tmp_path: Path,
                                                          prepared_byte_data: Path) -> None:
    """DCP logs a traceback on the root logger when a checkpoint's metadata cannot be read, before failing
    anyway; a user reads one line per event."""
    run = _copy(base_run, tmp_path)
    ckpt = run / "checkpoints/step_00000010"
    (ckpt / "dcp/.metadata.json").unlink()
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["files"]["dcp/.metadata.json"], meta["checksums"]["files"]["dcp/.metadata.json"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    p = _resume(run, prepared_byte_data)
    assert p.returncode == 0, p.stderr
    lines = _err_lines(p)
    assert len(lines) == 1 and "step_00000010/dcp: no DCP metadata" in lines[0], p.stderr


def test_resume_path_errors_and_run_dirs(base_run: Path, tmp_path: Path, prepared_byte_data: Path) -> None:
    run = _copy(base_run, tmp_path)
    p = _resume(run, prepared_byte_data, "checkpoint.resume=/does/not/exist")
    assert p.returncode == 2 and _err_lines(p) == ["error: checkpoint.resume=/does/not/exist: no such directory"]
    p = _resume(tmp_path / "other", prepared_byte_data, f"checkpoint.resume={run}")  # a run dir, as init_from takes
    assert p.returncode == 0, p.stderr
    assert f"resumed from {run}/checkpoints/step_00000010 at step 10" in p.stdout


def test_a_full_disk_leaves_the_last_checkpoint_intact(tmp_path: Path, prepared_byte_data: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    # 3 MiB: the first checkpoint of the debug model (~1.9 MB) fits, the second cannot
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        run = small / "run"
        p = _resume(run, prepared_byte_data, steps=12)
        assert p.returncode == 1
        lines = _err_lines(p)
        assert lines == [f"error: no space left on device writing {run}/checkpoints/step_00000010.tmp; "
                         "step_00000005 is intact"], p.stderr
        assert sorted(q.name for q in (run / "checkpoints").iterdir()) == ["step_00000005"]  # partial removed
        assert verify(str(run / "checkpoints/step_00000005"), checksums=True) is None
        assert not (run / ".lock").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_workers_exit_when_the_torchrun_agent_is_killed(tmp_path: Path, prepared_byte_data: Path) -> None:
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *ARGS,
           f"data.dir={prepared_byte_data}", f"out_dir={out}", "train.max_steps=100000", "train.log_interval=1",
           "checkpoint.interval=0"]
    with open(log, "w") as f:
        agent = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while not re.search(r"^step +3/\d+ \|", log.read_text(), re.M):
            assert time.time() < deadline and agent.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        workers = [p for p in psutil.Process(agent.pid).children(recursive=True)
                   if "launch/pretrain.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        agent.send_signal(signal.SIGKILL)  # the agent dies; nobody is left to stop the workers
        agent.wait()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"orphaned workers still running: {[p.pid for p in alive]}"
        steps = len(read_metrics(out))
        time.sleep(2)
        assert len(read_metrics(out)) == steps  # no more training after the workers noticed
        assert "the torchrun agent (pid" in log.read_text()
    finally:
        for p in workers:
            try:
                p.kill()
            except psutil.Error:
                pass
