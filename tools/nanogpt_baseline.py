"""karpathy/nanoGPT as the baseline of tools/gpu_check.py: its command lines, its data layout, its output.

nanoGPT is not vendored: point `--nanogpt DIR` at a copy (a git-ignored folder such as baselines/nanoGPT:
`git clone https://github.com/karpathy/nanoGPT baselines/nanoGPT` where there is a network). This module
  * builds the `bench.py` command (random tokens, GPT-2 124M, micro-batch B x 1024, bf16, compile on/off)
    and reads its "time per iteration: X ms" line -> tokens/s = B * 1024 / X,
  * prepares nanoGPT's `shakespeare_char` dataset (train.bin / val.bin uint16 ids, meta.pkl with
    vocab_size / stoi / itos, first 90% train) from our bundled Tiny Shakespeare exactly as its
    data/shakespeare_char/prepare.py does, but offline and into a scratch run directory,
  * builds the `train.py config/train_shakespeare_char.py` command and reads its "step N: train loss ..,
    val loss .." lines.
nanoGPT's scripts read `configurator.py` and `data/<dataset>` relative to the working directory, so the
training run happens in a scratch directory holding a link to configurator.py and the prepared data;
nothing is written into DIR.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np

SEQ = 1024  # bench.py's block_size (GPT-2's context); our bench_train row uses the same
FILES = ("bench.py", "train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
# Keys our command lines set through nanoGPT's configurator (it rejects unknown keys with an assertion).
BENCH_KEYS = ("real_data", "compile", "batch_size")
TRAIN_KEYS = ("out_dir", "compile")

_TIME_RE = re.compile(r"time per iteration:\s*([0-9.]+)\s*ms")
_VAL_RE = re.compile(r"step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)")


def missing_files(nanogpt_dir: Path) -> list[str]:
    """The nanoGPT files these command lines need that `nanogpt_dir` lacks ([] = usable)."""
    return [f for f in FILES if not (nanogpt_dir / f).is_file()]


def unknown_keys(script: Path, keys: tuple[str, ...]) -> list[str]:
    """Keys we would pass as --key=value that `script` does not define as a global (configurator asserts)."""
    text = script.read_text()
    return [k for k in keys if not re.search(rf"^{k}\s*=", text, re.MULTILINE)]


def bench_command(batch: int, compiled: bool) -> list[str]:
    """bench.py on random tokens (no dataset needed), run with cwd = the nanoGPT directory."""
    return [sys.executable, "bench.py", "--real_data=False", f"--compile={compiled}", f"--batch_size={batch}"]


def parse_bench(stdout: str, batch: int) -> dict[str, float]:
    """bench.py's output -> {"step_ms", "tok_per_s"} (tokens/s = batch * 1024 / time per iteration)."""
    times = _TIME_RE.findall(stdout)
    if not times:
        raise ValueError("no 'time per iteration: X ms' line in bench.py's output")
    ms = float(times[-1])
    return {"step_ms": ms, "tok_per_s": batch * SEQ / (ms / 1000)}


def prepare_shakespeare_char(text_path: Path, data_dir: Path) -> dict[str, int]:
    """nanoGPT's data/shakespeare_char/prepare.py, offline: text -> train.bin, val.bin, meta.pkl in data_dir.

    Characters sorted into ids 0..V-1, the first 90% of the text for training and the rest for
    validation, ids as uint16. Returns {"vocab_size", "train_tokens", "val_tokens"}.
    """
    data = text_path.read_text(encoding="utf-8")
    chars = sorted(set(data))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(data)
    split = int(n * 0.9)
    data_dir.mkdir(parents=True, exist_ok=True)
    ids = np.array([stoi[c] for c in data], dtype=np.uint16)  # (n,)
    ids[:split].tofile(data_dir / "train.bin")
    ids[split:].tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return {"vocab_size": len(chars), "train_tokens": split, "val_tokens": n - split}


def train_workdir(nanogpt_dir: Path, text_path: Path, workdir: Path) -> Path:
    """A scratch working directory for train.py: configurator.py linked, data/shakespeare_char prepared."""
    workdir.mkdir(parents=True, exist_ok=True)
    link = workdir / "configurator.py"
    if not link.exists():
        os.symlink((nanogpt_dir / "configurator.py").resolve(), link)
    prepare_shakespeare_char(text_path, workdir / "data" / "shakespeare_char")
    return workdir


def train_command(nanogpt_dir: Path, out_dir: Path, compiled: bool = True) -> list[str]:
    """train.py with nanoGPT's character config, run with cwd = `train_workdir(...)`."""
    d = nanogpt_dir.resolve()
    return [sys.executable, str(d / "train.py"), str(d / "config/train_shakespeare_char.py"),
            f"--out_dir={out_dir}", f"--compile={compiled}"]


def parse_train(stdout: str) -> dict[str, float]:
    """train.py's output -> the last evaluation: {"step", "train_loss", "val_loss"}."""
    evals = _VAL_RE.findall(stdout)
    if not evals:
        raise ValueError("no 'step N: train loss X, val loss Y' line in train.py's output")
    step, train, val = evals[-1]
    return {"step": int(step), "train_loss": float(train), "val_loss": float(val)}
