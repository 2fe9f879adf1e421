"""tools/gpu_check.py on CPU: --dry-run checks every command line; nanoGPT's data layout and output parsing."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, cpu_env, load_tool


@pytest.fixture(scope="module")
def gc():
    return load_tool("gpu_check")


def fake_nanogpt(root: Path, bench_keys: tuple[str, ...] = ("real_data", "compile", "batch_size")) -> Path:
    """The files of a nanoGPT checkout with the globals its configurator would check (contents not run)."""
    (root / "config").mkdir(parents=True)
    (root / "bench.py").write_text("".join(f"{k} = 1\n" for k in bench_keys))
    (root / "train.py").write_text("out_dir = 'out'\ncompile = True\n")
    (root / "model.py").write_text("")
    (root / "configurator.py").write_text("")
    (root / "config/train_shakespeare_char.py").write_text("batch_size = 64\n")
    return root


def test_dry_run_checks_every_command_line_and_exits_0(tmp_path: Path) -> None:
    """What CI runs: no GPU, no nanoGPT copy; every step's script exists and accepts its flags."""
    p = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=cpu_env(OUT=str(tmp_path / "out")))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for name in ("kernels", "ours b12 compile", "ours b16 eager", "bench_kernels", "pretrain default",
                 "bench_lora", "learning ours"):
        assert f"  {name}" in out and out.split(f"  {name}", 1)[1].split()[0] == "ok", out
    assert "nanoGPT b12 compile    skip: nanoGPT not there" in out
    assert "dry run: 14 steps, 0 with problems" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_with_nanogpt_checks_its_keys_and_prepares_data(gc, tmp_path: Path, capsys) -> None:
    good = fake_nanogpt(tmp_path / "good")
    assert gc.main(["--dry-run", "--nanogpt", str(good)]) == 0
    out = capsys.readouterr().out
    assert "nanoGPT b16 eager      ok" in out and "learning nanoGPT       ok" in out
    assert "'vocab_size': 65" in out  # Tiny Shakespeare's 65 distinct characters
    bad = fake_nanogpt(tmp_path / "bad", bench_keys=("compile", "batch_size"))  # an old bench.py: no real_data
    assert gc.main(["--dry-run", "--nanogpt", str(bad)]) == 1
    assert "real_data" in capsys.readouterr().out


def test_help_check_catches_a_flag_the_script_does_not_take(gc) -> None:
    assert gc.help_accepts(REPO / "tools/bench_train.py", ["--batch", "--compile"]) == []
    assert gc.help_accepts(REPO / "tools/bench_train.py", ["--no-such-flag"]) == [
        "bench_train.py does not accept --no-such-flag"]
    assert gc.config_parses(["optim.lr=-1"])() != [] and gc.config_parses(["optim.lr=1e-3"])() == []


def test_shakespeare_char_layout_matches_nanogpt_prepare(gc, tmp_path: Path) -> None:
    info = gc.nano.prepare_shakespeare_char(gc.SHAKESPEARE, tmp_path)
    text = gc.SHAKESPEARE.read_text(encoding="utf-8")
    meta = pickle.loads((tmp_path / "meta.pkl").read_bytes())
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert meta["vocab_size"] == info["vocab_size"] == 65 and meta["itos"][0] == "\n" and meta["stoi"]["a"] == 39
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train, val])) == text


def test_nanogpt_output_parsing(gc) -> None:
    out = "0/20 loss: 10.9\n19/20 loss: 10.8\ntime per iteration: 26.9000ms, MFU: 45.12%\n"
    assert gc.nano.parse_bench(out, 12) == {"step_ms": 26.9, "tok_per_s": pytest.approx(12 * 1024 / 0.0269)}
    assert gc.nano.parse_bench("time per iteration: 40.0000ms\n", 16)["tok_per_s"] == pytest.approx(409_600)
    log = ("step 0: train loss 4.2874, val loss 4.2823\niter 0: loss 4.2654, time 29.65ms, mfu -100.00%\n"
           "step 5000: train loss 0.6189, val loss 1.4697\n")
    assert gc.nano.parse_train(log) == {"step": 5000, "train_loss": 0.6189, "val_loss": 1.4697}
    with pytest.raises(ValueError):
        gc.nano.parse_bench("Traceback ...", 12)


def test_comparison_rows_and_table(gc) -> None:
    recs = [
        {"name": "ours b12 compile", "status": "ok", "seconds": 60.0,
         "result": {"default": {"tok_per_s": 354_861.0, "step_ms": 34.6, "mfu": 0.307, "peak_mem_gib": 20.0}}},
        {"name": "nanoGPT b12 compile", "status": "ok", "seconds": 50.0,
         "result": {"tok_per_s": 456_800.0, "step_ms": 26.9}},
        {"name": "ours b16 eager", "status": "ok", "seconds": 20.0,
         "result": {"off": {"tok_per_s": 300_000.0, "step_ms": 54.6, "mfu": None, "peak_mem_gib": 30.0}}},
        {"name": "nanoGPT b16 eager", "status": "skipped", "note": "nanoGPT not there: (no --nanogpt DIR)"},
        {"name": "kernels", "status": "timeout", "seconds": 150.0, "note": "killed after 150 s"},
    ]
    comps = gc.comparisons(recs)
    assert [c["what"] for c in comps] == ["tok/s b12 compile", "tok/s b16 eager"]
    assert comps[0]["ratio"] == pytest.approx(354_861 / 456_800) and comps[1]["ratio"] is None
    t = gc.table(recs, comps)
    assert "| ours b12 compile | ok | 60 | default: 354,861 tok/s, 34.6 ms, MFU 30.7% |" in t
    assert "| tok/s b12 compile | 354,861 | 456,800 | 0.78x |" in t
    assert "| kernels | timeout | 150 | killed after 150 s |" in t


def test_run_step_parses_times_out_and_skips(gc, tmp_path: Path) -> None:
    """The runner itself: output to a log and parsed; a step past its limit killed; no budget, no start."""
    py = sys.executable
    ok = gc.Step("fake nanoGPT", [py, "-c", "print('time per iteration: 10.0000ms')"], 60,
                 parse=lambda s, _o: gc.nano.parse_bench(s, 12))
    r = gc.run_step(ok, tmp_path, 100, {})
    assert r["status"] == "ok" and r["result"]["tok_per_s"] == pytest.approx(1_228_800)
    assert "time per iteration" in Path(r["log"]).read_text()
    slow = gc.Step("slow", [py, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    r = gc.run_step(slow, tmp_path, 100, {}, min_seconds=1)
    assert r["status"] == "timeout" and r["seconds"] < 30 and "started" in Path(r["log"]).read_text()
    bad = gc.Step("bad", [py, "-c", "print('no figures here')"], 60, parse=lambda s, _o: gc.nano.parse_bench(s, 12))
    assert gc.run_step(bad, tmp_path, 100, {})["status"] == "failed"
    assert gc.run_step(ok, tmp_path, 10, {})["status"] == "skipped"  # 10 s of budget left < 20 s minimum
