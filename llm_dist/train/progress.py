"""How far a run is: elapsed wall time, the ETA of the last step, and the one-line bar a terminal shows.

The ETA extrapolates the average wall time per step of this process (evaluation and checkpoint pauses
included, since they will recur) to the steps left; a resumed run measures from where it resumed.
"""

from __future__ import annotations

import math
import time


def format_duration(seconds: float) -> str:
    """45s, 1m02s, 2h03m, 3d04h: two units at most, like a clock someone glances at."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class Progress:
    """Elapsed time and ETA towards `total` steps, counted from `start_step` (0, or the step resumed at)."""

    def __init__(self, total: int, start_step: int = 0, clock=time.monotonic) -> None:  # noqa: ANN001
        self.total, self.start_step, self._clock = total, start_step, clock
        self._t0 = clock()

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def fields(self, step: int) -> dict[str, float]:
        """{"elapsed_s", "eta_s"} at `step` (eta_s is nan until a step has been timed)."""
        elapsed = self.elapsed()
        done = step - self.start_step
        eta = elapsed / done * max(self.total - step, 0) if done > 0 else math.nan
        return {"elapsed_s": elapsed, "eta_s": eta}


def render_bar(step: int, total: int, elapsed_s: float, eta_s: float, sec_per_step: float, width: int = 24) -> str:
    """`[#########...............]  120/2000   6% | 34.5 ms/step | elapsed 1m02s | eta 3m10s`."""
    frac = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    filled = int(frac * width)
    per = f"{1000 * sec_per_step:.1f} ms/step" if sec_per_step < 1 else f"{sec_per_step:.2f} s/step"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {step:>{len(str(total))}}/{total} {100 * frac:3.0f}% | {per} | "
            f"elapsed {format_duration(elapsed_s)} | eta {format_duration(eta_s)}")
