"""llm_dist/train/progress.py and the console sink: `step N/TOTAL`, elapsed / ETA, the terminal-only bar."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from llm_dist.config import LoggingConfig
from llm_dist.train.logger import ConsoleSink, MetricsLogger
from llm_dist.train.progress import Progress, format_duration, render_bar


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 44.6, 62, 3599, 3600 + 180, 86400 * 3 + 3600 * 4)] == \
        ["0s", "45s", "1m02s", "59m59s", "1h03m", "3d04h"]
    assert format_duration(math.nan) == "?"


def test_eta_extrapolates_this_process_steps() -> None:
    now = [100.0]
    p = Progress(total=2000, start_step=100, clock=lambda: now[0])  # resumed at step 100
    assert math.isnan(p.fields(100)["eta_s"])
    now[0] += 20.0  # 20 steps in 20 s
    assert p.fields(120) == {"elapsed_s": 20.0, "eta_s": 1880.0}
    assert p.fields(2000)["eta_s"] == 0.0


def test_bar() -> None:
    bar = render_bar(120, 2000, 62, 190, 0.0345, width=20)
    assert bar == "[#...................]  120/2000   6% | 34.5 ms/step | elapsed 1m02s | eta 3m10s"
    assert render_bar(2, 2, 3, 0, 1.5, width=4).startswith("[####] 2/2 100% | 1.50 s/step")


def _logger(tmp_path: Path, tty: bool) -> tuple[MetricsLogger, io.StringIO]:
    out = io.StringIO()
    log = MetricsLogger(tmp_path, LoggingConfig())
    log.sinks[0] = ConsoleSink(stream=out, tty=tty)
    log.set_total(2000)
    return log, out


def test_plain_lines_off_a_terminal_jsonl_keeps_seconds(tmp_path: Path) -> None:
    log, out = _logger(tmp_path, tty=False)
    log.progress(119, 61.0, 191.0, 0.03)  # no bar in a file
    log.log(120, {"loss": 3.25, "step_time": 0.0345, "mfu": 0.307, "elapsed_s": 62.0, "eta_s": 190.0})
    log.close()
    assert out.getvalue() == ("step  120/2000 | loss 3.2500 | step_time 34.5 ms | mfu 30.7% | elapsed 1m02s | "
                              "eta 3m10s\n")
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["elapsed_s"] == 62.0 and rec["eta_s"] == 190.0 and rec["step_time"] == 0.0345
    assert log.latest == {"loss": 3.25, "step_time": 0.0345, "mfu": 0.307, "elapsed_s": 62.0, "eta_s": 190.0}


def test_bar_on_a_terminal_is_erased_before_each_line(tmp_path: Path) -> None:
    log, out = _logger(tmp_path, tty=True)
    log.progress(119, 61.0, 191.0, 0.03)
    log.progress(119, 61.0, 191.0, 0.03)  # within redraw_s of the last draw: skipped
    log.log(120, {"loss": 3.25})
    log.text(120, "sample", "ROMEO:")
    log.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K[") == 1 and "119/2000" in text
    line_start = text.index("step  120/2000 | loss 3.2500\n")
    assert text[line_start - 4:line_start] == "\r\x1b[K"  # the bar was erased first
    assert "---- sample at step 120 ----\nROMEO:\n" in text
