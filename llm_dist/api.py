"""Run a stage from Python (a notebook, a sweep script) instead of a launcher: `train(...)` -> RunResult.

    from llm_dist.api import train
    result = train("debug", ["train.max_steps=20", "out_dir=runs/notebook"])
    print(result.run_dir, result.metrics["loss"])

The config is checked exactly as `llm-dist <stage>` checks it; errors are raised (ConfigError, DataPrepError,
... with the same one-line messages) rather than turned into exit codes. A stage that stopped early says so
in `result.exit_code` (0 finished, 75 stopped by a signal after saving, 3 halted on NaN/Inf).

A stage sets process-wide torch switches for its run (anomaly detection, deterministic algorithms, the CPU
thread count, TF32); `train` puts them back afterwards, so the rest of a notebook session runs as before.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from llm_dist.cli import COMMANDS, check_config
from llm_dist.config import Config, apply_override, load_config
from llm_dist.run_lock import release_all
from llm_dist.stages import RunResult

__all__ = ["RunResult", "config", "train"]


def config(path_or_name: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """A Config from a YAML file or a shipped config's name (`debug`, `configs/sft_gsm8k.yaml`) plus dotted
    `key=value` overrides, as `--config` and the command line give it. Not validated yet (`train` does)."""
    return load_config(path_or_name, list(overrides))


@contextmanager
def torch_switches_restored() -> Iterator[None]:
    """Restore the process-wide torch settings a stage may change, however the block ends."""
    anomaly, check_nan = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.autograd.set_detect_anomaly(anomaly, check_nan)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def train(cfg: Config | str | None = None, overrides: Sequence[str] = (), stage: str = "pretrain") -> RunResult:
    """Run `stage` (pretrain | sft | reward | ppo | grpo, or any stage command of `llm-dist`) in this process.

    `cfg`: a Config (copied, so yours is left as it was), a YAML path / shipped config name, or None for the
    defaults; `overrides` are applied on top. Under torchrun, every rank calls it.
    """
    command = COMMANDS.get(stage)
    if command is None or command.kind != "stage":
        stages = [name for name, c in COMMANDS.items() if c.kind == "stage"]
        raise ValueError(f"stage {stage!r}: expected one of {', '.join(stages)}")
    if isinstance(cfg, Config):
        run_cfg = copy.deepcopy(cfg)  # a stage fills in derived values (vocab size, the init model's shape)
        for o in overrides:
            apply_override(run_cfg, o)
    else:
        run_cfg = config(cfg, overrides)
    check_config(run_cfg)
    try:
        with torch_switches_restored():
            return command.load()(run_cfg)
    finally:
        release_all()  # the run directory's lock, as `cli.run` does
