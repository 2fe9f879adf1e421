"""Tokens/s, model FLOPs utilisation (MFU) and memory for the log line."""

from __future__ import annotations

import time

import psutil
import torch

# Dense (no sparsity) peak TFLOP/s per GPU for the training dtype, from the vendors' datasheets.
_PEAK_TFLOPS = {
    # name fragment: {dtype: TFLOP/s}
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # fp32 matmuls run as TF32 (dense)
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # SXM; TF32 dense
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},  # TF32 dense
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
}


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one device for `dtype` ("bf16" | "fp16" | "fp32"), or None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, table in _PEAK_TFLOPS.items():
        if frag in name:
            return table[dtype] * 1e12
    return None


def memory_gib(device: torch.device) -> float:
    """CUDA max allocated since the last reset, else this process's resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Throughput:
    """Wall time between `tick`s, turned into tokens/s and MFU.

    MFU = achieved model FLOP/s / (peak FLOP/s per device * devices), with model FLOPs from the
    6N + 12·L·H·Q·T formula (PaLM, appendix B): recomputation from activation checkpointing does not count.
    """

    def __init__(self, flops_per_token: float, peak_flops_per_device: float | None, world_size: int) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_per_device * world_size if peak_flops_per_device else None
        self._t = time.perf_counter()

    def tick(self, tokens: int) -> dict[str, float]:
        """Call once per step after the step's work is done (synchronise CUDA first for honest timings)."""
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        tps = tokens / max(dt, 1e-9)
        out = {"step_time": dt, "tok_per_s": tps}
        if self.peak:
            out["mfu"] = tps * self.flops_per_token / self.peak
        return out

    def reset(self) -> None:
        """Restart the clock (after evaluation or a checkpoint, which are not training time)."""
        self._t = time.perf_counter()
