"""Metrics out of the training loop: console, a JSONL file (always), and optionally wandb / TensorBoard.

Only rank 0 writes. A failing optional backend (wandb not installed, offline errors, TensorBoard missing)
warns once and is switched off; it never stops training.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from llm_dist.config import LoggingConfig


def _fmt(key: str, v: Any) -> str:
    if isinstance(v, float):
        if key == "lr":
            return f"{key} {v:.2e}"
        if math.isfinite(v) and 0 < abs(v) < 1e-3:
            return f"{key} {v:.3e}"
        return f"{key} {v:.4f}" if abs(v) < 100 else f"{key} {v:,.0f}"
    return f"{key} {v}"


class MetricsLogger:
    """`log(step, metrics)` to every enabled sink. Construct on every rank; only `enabled` ranks write."""

    def __init__(self, out_dir: str | os.PathLike, cfg: LoggingConfig, run_config: dict | None = None,
                 enabled: bool = True, filename: str = "metrics.jsonl") -> None:
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(out_dir) / filename
        self._jsonl = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line
        if cfg.wandb != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb, dir=str(out_dir),
                                         config=run_config, name=Path(out_dir).name)
            except Exception as e:  # noqa: BLE001 - any wandb failure must not stop training
                self._warn(f"wandb disabled: {type(e).__name__}: {e}")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
            except Exception as e:  # noqa: BLE001
                self._warn(f"TensorBoard disabled: {type(e).__name__}: {e}")

    @staticmethod
    def _warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict[str, Any], console: bool = True, prefix: str = "") -> None:
        """Write one record. Keys with a `/` (e.g. `val/loss`) are kept as they are in JSONL and wandb."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record, default=float) + "\n")
        if console:
            body = " | ".join(_fmt(k, v) for k, v in metrics.items())
            print(f"{prefix}step {step:>6} | {body}", flush=True)
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
            except Exception as e:  # noqa: BLE001
                self._warn(f"wandb logging failed, disabled: {e}")
                self._wandb = None
        if self._tb is not None:
            try:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)):
                        self._tb.add_scalar(k, v, step)
            except Exception as e:  # noqa: BLE001
                self._warn(f"TensorBoard logging failed, disabled: {e}")
                self._tb = None

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass
