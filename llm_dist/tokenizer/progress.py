"""A dependency-free progress bar for long tokenizer jobs (pre-tokenization, BPE merges).

Writes a single carriage-return-refreshed line to stderr, throttled so that updating it in a tight loop
costs next to nothing. When stderr is not a terminal (logs, CI) it prints at most ~10 plain lines per
bar instead of thousands of carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_eta(fraction: float, elapsed_s: float) -> str:
    """Time left at the average rate so far, as "42s", "3m05s" or "1h02m" ("?" before any progress)."""
    if fraction <= 0 or elapsed_s <= 0:
        return "?"
    left = max(elapsed_s * (1.0 - min(fraction, 1.0)) / fraction, 0.0)
    if left < 60:
        return f"{left:.0f}s"
    if left < 3600:
        return f"{int(left // 60)}m{int(left % 60):02d}s"
    return f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m"


class Progress:
    """`with Progress("merges", total=n) as bar: ... bar.update(k)`; `enabled=False` makes it silent."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "it",
        enabled: bool = True,
        stream: TextIO | None = None,
        min_interval_s: float = 0.1,
    ) -> None:
        self.desc, self.total, self.unit, self.enabled = desc, max(int(total), 0), unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        # Without a terminal, redraws become new lines: space them out so a log gets ~10, not 10,000.
        self._min_interval = min_interval_s if self._tty else max(min_interval_s, 5.0)
        self._last_decile = -1

    def update(self, n: int = 1) -> None:
        """Advance by n and redraw if enough time has passed since the last redraw."""
        self.count += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._tty:
            if now - self._last_draw >= self._min_interval:
                self._draw(now, end="\r")
        else:
            decile = (10 * self.count) // self.total if self.total else 0
            new_decile = decile > self._last_decile and now - self._last_draw >= 0.5
            if new_decile or now - self._last_draw >= self._min_interval:
                self._last_decile = decile
                self._draw(now, end="\n")

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw(time.perf_counter(), end="\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self, now: float, end: str) -> None:
        self._last_draw = now
        elapsed = now - self._start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(self.count / self.total, 1.0)
            filled = int(24 * frac)
            bar = "#" * filled + "." * (24 - filled)
            eta = (self.total - self.count) / rate if rate > 0 else 0.0
            line = (
                f"{self.desc}: [{bar}] {self.count:,}/{self.total:,} {self.unit} "
                f"{100 * frac:5.1f}% {elapsed:6.1f}s eta {eta:5.1f}s ({rate:,.0f} {self.unit}/s)"
            )
        else:
            line = f"{self.desc}: {self.count:,} {self.unit} {elapsed:6.1f}s ({rate:,.0f} {self.unit}/s)"
        self.stream.write(line + end)
        self.stream.flush()
