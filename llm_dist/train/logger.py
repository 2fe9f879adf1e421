"""Metrics out of the training loop: console, a JSONL file (always), and optionally wandb / TensorBoard.

The console line reads `step 120/2000 | loss 3.2500 | ... | step_time 34.5 ms | tok_per_s 354,861 | mfu 30.7% |
mem_gib 4.5000 | elapsed 1m02s | eta 3m10s`; on a terminal a progress bar is redrawn on its last line
between those lines, while a file or a SLURM log gets the plain lines only.

One interface (`MetricsLogger.log` for numbers, `.text` for samples) in front of several sinks. Only
rank 0 writes. A sink that fails (wandb not installed or offline, TensorBoard missing, a full disk under
the JSONL file) warns once, naming the backend and the error, and is switched off; training never stops
because of a logger.
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
from llm_dist.train.progress import format_duration, render_bar

# Durations the console shows as clock time (JSONL keeps the seconds): key -> its console name.
_DURATIONS = {"elapsed_s": "elapsed", "eta_s": "eta"}


def _is_time(key: str) -> bool:
    """Keys holding seconds: step_time, time_generate, time_score, ..."""
    return "time" in key.rsplit("/", 1)[-1].split("_")


def _fmt(key: str, v: Any) -> str:
    """One `key value` field of the console line. JSONL keeps raw numbers; only the console adds units:
    MFU (a fraction) as a percentage, times (seconds) in ms or s, elapsed / eta as 1m02s."""
    if key in _DURATIONS and isinstance(v, (int, float)):
        return f"{_DURATIONS[key]} {format_duration(v)}"
    if isinstance(v, float):
        if key == "lr":
            return f"{key} {v:.2e}"
        if not math.isfinite(v):
            return f"{key} {v}"
        if key.rsplit("/", 1)[-1] == "mfu":
            pct = 100 * v
            return f"{key} {pct:.1f}%" if pct >= 1 else f"{key} {pct:.2g}%"
        if _is_time(key):
            return f"{key} {1000 * v:.1f} ms" if abs(v) < 1 else f"{key} {v:.2f} s"
        if 0 < abs(v) < 1e-3:
            return f"{key} {v:.3e}"
        return f"{key} {v:.4f}" if abs(v) < 100 else f"{key} {v:,.0f}"
    return f"{key} {v}"


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries (bools excluded): what plotting backends can draw."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Sink:
    """One backend. `scalars` gets every record, `text` every sample; both may raise (the logger catches)."""

    name = "sink"

    def scalars(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        raise NotImplementedError

    def text(self, step: int, key: str, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ConsoleSink(Sink):
    """`step N/TOTAL | key value | ...` on stdout (MFU in %, times with units) and, when stdout is a terminal,
    a progress bar on the last line, erased before each line printed (and by `clear`)."""

    name = "console"
    redraw_s = 0.1  # a bar redrawn more often only costs terminal time

    def __init__(self, stream=None, tty: bool | None = None) -> None:  # noqa: ANN001 - a text stream
        self.stream = stream
        self.tty = tty
        self.total: int | None = None  # max_steps, once the loop has said it
        self._bar_shown = False
        self._last_draw = -math.inf

    def _out(self):  # noqa: ANN202 - sys.stdout as it is now (tests and notebooks swap it)
        return self.stream if self.stream is not None else sys.stdout

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        isatty = getattr(self._out(), "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def clear(self) -> None:
        """Erase the bar, so that whatever is printed next starts on a clean line."""
        if self._bar_shown:
            self._out().write("\r\x1b[K")
            self._out().flush()
            self._bar_shown = False

    def scalars(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        self.clear()
        body = " | ".join(_fmt(k, v) for k, v in metrics.items())
        where = f"{step:>{len(str(self.total))}}/{self.total}" if self.total else f"{step:>6}"
        print(f"{prefix}step {where} | {body}", file=self._out(), flush=True)

    def text(self, step: int, key: str, text: str) -> None:
        self.clear()
        print(f"---- {key} at step {step} ----\n{text}\n-------------------------------", file=self._out(), flush=True)

    def progress(self, step: int, elapsed_s: float, eta_s: float, sec_per_step: float) -> None:
        """Redraw the bar (terminals only; at most every `redraw_s`, and always at the last step)."""
        if not self.total or not self._is_tty():
            return
        now = time.monotonic()
        if now - self._last_draw < self.redraw_s and step < self.total:
            return
        self._last_draw = now
        self._out().write("\r\x1b[K" + render_bar(step, self.total, elapsed_s, eta_s, sec_per_step))
        self._out().flush()
        self._bar_shown = True

    def close(self) -> None:
        self.clear()


class JSONLSink(Sink):
    """One JSON object per line: {"step", "time", **metrics}; samples as {"step", "time", key: text}."""

    name = "JSONL"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def _write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, default=float) + "\n")

    def scalars(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        self._write({"step": step, "time": time.time(), **metrics})

    def text(self, step: int, key: str, text: str) -> None:
        self._write({"step": step, "time": time.time(), key: text})

    def close(self) -> None:
        self._f.close()


class WandbSink(Sink):
    """Weights & Biases in `online` or `offline` mode (offline runs sync later with `wandb sync`)."""

    name = "wandb"

    def __init__(self, out_dir: Path, cfg: LoggingConfig, run_config: dict | None) -> None:
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb, dir=str(out_dir), config=run_config,
                               name=out_dir.name)

    def scalars(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        self._run.log(_scalars(metrics), step=step)

    def text(self, step: int, key: str, text: str) -> None:
        self._run.log({key: self._wandb.Html(f"<pre>{_html_escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self._run.finish()


class TensorBoardSink(Sink):
    """Event files under <out_dir>/tensorboard (`tensorboard --logdir <out_dir>/tensorboard`)."""

    name = "TensorBoard"

    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def scalars(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
        for k, v in _scalars(metrics).items():
            self._w.add_scalar(k, v, step)

    def text(self, step: int, key: str, text: str) -> None:
        # TensorBoard renders text as Markdown: a code block keeps line breaks and indentation.
        self._w.add_text(key, "```\n" + text + "\n```", step)

    def close(self) -> None:
        self._w.close()


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class MetricsLogger:
    """`log(step, metrics)` / `text(step, key, text)` to every enabled sink.

    Construct on every rank; only `enabled` ranks (rank 0) open sinks and write. The JSONL file is always
    written (tools/plot_metrics.py reads it); console, wandb (`logging.wandb`: online | offline |
    disabled) and TensorBoard (`logging.tensorboard`) are the others.
    """

    def __init__(self, out_dir: str | os.PathLike, cfg: LoggingConfig, run_config: dict | None = None,
                 enabled: bool = True, filename: str = "metrics.jsonl") -> None:
        self.enabled = enabled
        self.latest: dict[str, float] = {}  # last value of every scalar logged (on every rank): a run's result
        self.sinks: list[Sink] = []
        self.warnings: list[str] = []  # every warning issued (one per failed backend)
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / filename
        self.sinks = [ConsoleSink(), JSONLSink(self.path)]
        if cfg.wandb != "disabled":
            self._open(lambda: WandbSink(out, cfg, run_config), "wandb")
        if cfg.tensorboard:
            self._open(lambda: TensorBoardSink(out), "TensorBoard")

    def _open(self, make, name: str) -> None:  # noqa: ANN001
        try:
            self.sinks.append(make())
        except Exception as e:  # noqa: BLE001 - any backend failure must not stop training
            self._warn(f"{name} disabled: {type(e).__name__}: {e}")

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    def _each(self, call, console: bool = True) -> None:  # noqa: ANN001
        """Call `call(sink)` on every sink; a sink that raises is dropped with one warning."""
        for sink in list(self.sinks):
            if not console and isinstance(sink, ConsoleSink):
                continue
            try:
                call(sink)
            except Exception as e:  # noqa: BLE001
                self._warn(f"{sink.name} logging failed, disabled for the rest of the run: {type(e).__name__}: {e}")
                self.sinks.remove(sink)
                try:
                    sink.close()
                except Exception:  # noqa: BLE001 - it is already broken; one warning is enough
                    pass

    def _console(self) -> ConsoleSink | None:
        return next((s for s in self.sinks if isinstance(s, ConsoleSink)), None)

    def set_total(self, total: int) -> None:
        """The step the run ends at: console lines then say `step 120/2000`, and the bar can be drawn."""
        console = self._console()
        if console is not None:
            console.total = total

    def progress(self, step: int, elapsed_s: float, eta_s: float, sec_per_step: float) -> None:
        """After every step: the console's progress bar (only on a terminal)."""
        console = self._console()
        if console is not None:
            console.progress(step, elapsed_s, eta_s, sec_per_step)

    def clear_progress(self) -> None:
        """Erase the bar before other code prints (evaluation, checkpoint messages)."""
        console = self._console()
        if console is not None:
            console.clear()

    def log(self, step: int, metrics: dict[str, Any], console: bool = True, prefix: str = "") -> None:
        """Write one record. Keys with a `/` (e.g. `val/loss`) are kept as they are in JSONL and wandb."""
        self.latest.update(_scalars(metrics))
        if self.enabled:
            self._each(lambda s: s.scalars(step, metrics, prefix), console=console)

    def text(self, step: int, key: str, text: str) -> None:
        """A piece of text (a sample generation) at `step`: JSONL record, TensorBoard text, wandb HTML."""
        if self.enabled:
            self._each(lambda s: s.text(step, key, text))

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - closing at the end must not turn a finished run into a crash
                pass
        self.sinks = []
