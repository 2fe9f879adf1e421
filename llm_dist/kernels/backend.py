"""Whether the Triton kernels can run for a given tensor, and the one-time message when they cannot.

A kernel runs when Triton is importable and either the tensor is on a CUDA device (compiled kernels) or
the kernel module was imported with `TRITON_INTERPRET=1` (Triton's CPU interpreter: slow, for tests).
Triton decides interpreted vs compiled when `@triton.jit` decorates a kernel, i.e. when the kernel
module is first imported, so the environment variable must be set before that; `interpreted()` reports
what the modules were actually built as, not what the environment says now.

Policy when a kernel cannot run (documented in docs/kernels.md): the caller falls back to its PyTorch
path (SDPA for attention, the PyTorch RMSNorm, the chunked PyTorch loss) and `warn_once` says so once
per process, naming the reason. Training never stops because a faster kernel is missing.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

_WARNED: set[str] = set()


def triton_installed() -> bool:
    """True when the `triton` package can be imported (it is not installed on macOS/Windows CPU builds)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether the kernel modules are (or, if not imported yet, will be) built for Triton's CPU interpreter."""
    if not triton_installed():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def unsupported_reason(t: torch.Tensor) -> str | None:
    """None when the Triton kernels can run on tensors like `t`; otherwise why not, in a few words."""
    if not triton_installed():
        return "triton is not installed (pip install 'llm_dist[kernels]')"
    if t.is_cuda:
        return None
    if interpreted():
        return None
    return (f"tensors are on {t.device.type}, and the kernels need a CUDA device or Triton's CPU interpreter "
            "(TRITON_INTERPRET=1 set before triton is imported)")


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a RuntimeWarning the first time `key` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
