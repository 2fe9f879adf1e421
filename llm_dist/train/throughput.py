"""Tokens/s, model FLOPs utilisation (MFU) and memory for the log line."""

from __future__ import annotations

import time

import psutil
import torch

# Dense (no sparsity) peak TFLOP/s per GPU for the training dtype, from the vendors' datasheets.
_PEAK_TFLOPS = {
    # name fragment: {dtype: TFLOP/s}; checked in this order, so the PCIe H100 (its own name) precedes "H100"
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # fp32 matmuls run as TF32 (dense)
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # SXM; TF32 dense
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},  # TF32 dense
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
}


def peak_tflops_for(name: str, dtype: str) -> float | None:
    """Datasheet peak TFLOP/s of the GPU called `name` (as `torch.cuda.get_device_name` spells it), or None."""
    for frag, table in _PEAK_TFLOPS.items():
        if frag in name:
            return table[dtype]
    return None


def peak_flops(device: torch.device, dtype: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for `dtype` ("bf16" | "fp16" | "fp32"), or None when unknown (e.g. CPU).

    `override_tflops` > 0 (`logging.peak_tflops`, `bench_train.py --peak-tflops`) wins over the lookup:
    for GPUs not in the table, or to state a CPU's peak.
    """
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_for(torch.cuda.get_device_name(device), dtype)
    return tflops * 1e12 if tflops is not None else None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_total: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices together.

    The one formula behind both the trainer's log and tools/bench_train.py.
    """
    return tokens_per_s * flops_per_token / peak_flops_total


def memory_gib(device: torch.device) -> float:
    """CUDA max allocated since the last reset, else this process's resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Throughput:
    """Tokens and wall time accumulated over the steps between two reports -> tokens/s and MFU.

    MFU = achieved model FLOP/s / (peak FLOP/s per device * devices), with model FLOPs from the
    6N + 12·L·H·Q·T formula (PaLM, appendix B): recomputation from activation checkpointing does not count.
    """

    def __init__(self, flops_per_token: float, peak_flops_per_device: float | None, world_size: int) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device * world_size if peak_flops_per_device else None
        self._time, self._tokens, self._steps = 0.0, 0, 0
        self._t = time.perf_counter()

    def step(self, tokens: int) -> None:
        """Count one finished step (its last host sync has happened, so wall time is honest on CUDA)."""
        now = time.perf_counter()
        self._time += now - self._t
        self._t = now
        self._tokens += tokens
        self._steps += 1

    def report(self) -> dict[str, float]:
        """Averages since the last report; then starts a new window."""
        out = {"step_time": self._time / max(self._steps, 1), "tok_per_s": self._tokens / max(self._time, 1e-9)}
        if self.peak:
            out["mfu"] = mfu(out["tok_per_s"], self.flops_per_token, self.peak)
        self._time, self._tokens, self._steps = 0.0, 0, 0
        return out

    def resume(self) -> None:
        """Restart the clock without counting the gap (evaluation and checkpoints are not training time)."""
        self._t = time.perf_counter()
