"""Profiling a window of training steps with `torch.profiler` (`profile.*` in the config).

The window is torch.profiler's own schedule: `wait` steps unprofiled, `warmup` steps profiled and
discarded, `active` steps recorded, once. When the window closes, the trace is written to the run
directory, either for TensorBoard's profiler plugin (`tensorboard_trace_handler`, `profile.trace=
tensorboard`, one `*.pt.trace.json` per rank under <out_dir>/profile/) or as one Chrome trace per rank
(`profile.trace=chrome`, <out_dir>/profile/trace_rank<r>.json, open in chrome://tracing or Perfetto),
and the top-kernels table (`key_averages().table`) is kept and printed by rank 0 at the end of the run.

On CUDA, `profile.memory_snapshot=true` also records the caching allocator's history over the same
window (`torch.cuda.memory._record_memory_history`) and dumps it as <out_dir>/profile/
memory_snapshot_rank<r>.pickle when the window closes; drag it into https://pytorch.org/memory_viz.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from llm_dist import distributed as D
from llm_dist.config import ProfileConfig


class StepProfiler:
    """`with StepProfiler(cfg, out_dir, device) as prof:` then `prof.step()` after every training step.

    Disabled (`profile.enabled=false`) it does nothing and costs nothing.
    """

    def __init__(self, cfg: ProfileConfig, out_dir: str | Path, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.dir = Path(out_dir) / "profile"
        self.rank = D.get_rank()
        self.table: str | None = None  # the top-kernels table, once the window has closed
        self.trace_files: list[Path] = []
        self.snapshot_file: Path | None = None
        self._prof: profile | None = None
        self._steps = 0
        self._recording_memory = False
        self.cuda = device.type == "cuda"
        if cfg.enabled and cfg.memory_snapshot and not self.cuda:
            D.warn0("profile.memory_snapshot needs CUDA (it records the CUDA caching allocator); skipped on "
                    f"{device.type}")

    @property
    def window_end(self) -> int:
        """The step count at which the trace is written."""
        return self.cfg.wait + self.cfg.warmup + self.cfg.active

    def sort_key(self) -> str:
        if self.cfg.sort_by != "auto":
            return self.cfg.sort_by
        return "self_device_time_total" if self.cuda else "self_cpu_time_total"

    def __enter__(self) -> "StepProfiler":
        if not self.cfg.enabled:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        c = self.cfg
        self._prof = profile(activities=activities, schedule=schedule(wait=c.wait, warmup=c.warmup, active=c.active,
                                                                      repeat=1),
                             on_trace_ready=self._trace_ready, record_shapes=c.record_shapes,
                             profile_memory=c.profile_memory, with_stack=c.with_stack)
        self._prof.__enter__()
        self._maybe_start_memory_history()
        return self

    def _maybe_start_memory_history(self) -> None:
        # Start recording allocator history when the profiled part of the window (warm-up + active) begins.
        if self.cfg.memory_snapshot and self.cuda and not self._recording_memory and self._steps == self.cfg.wait:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self._recording_memory = True

    def _trace_ready(self, prof: profile) -> None:
        """The window has closed: write the trace, keep the table, dump the memory snapshot."""
        if self.cfg.trace == "chrome":
            path = self.dir / f"trace_rank{self.rank}.json"
            prof.export_chrome_trace(str(path))
        else:
            tensorboard_trace_handler(str(self.dir), worker_name=f"rank{self.rank}")(prof)
        self.trace_files = sorted(self.dir.glob(f"*rank{self.rank}*.json*"))
        self.table = prof.key_averages().table(sort_by=self.sort_key(), row_limit=self.cfg.row_limit)
        if self._recording_memory:
            self.snapshot_file = self.dir / f"memory_snapshot_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(self.snapshot_file))
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False

    def step(self) -> None:
        """Mark the end of one training step."""
        if self._prof is None:
            return
        self._prof.step()
        self._steps += 1
        self._maybe_start_memory_history()

    def __exit__(self, *exc: object) -> None:
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)  # a window cut short by the end of training is flushed here
        self._prof = None
        if self._recording_memory:  # ended before the window closed
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording_memory = False
        if self.table is None:
            D.warn0(f"profiler: training ended after {self._steps} steps, before the profile window "
                    f"(profile.wait + warmup + active = {self.window_end} steps) closed; no trace written")
            return
        D.print0(f"profile of steps {self.cfg.wait + self.cfg.warmup + 1}-{self.window_end} "
                 f"(sorted by {self.sort_key()}); trace in {self.dir}\n{self.table}")
        if self.snapshot_file is not None:
            D.print0(f"CUDA memory snapshot: {self.snapshot_file} (open in https://pytorch.org/memory_viz)")
