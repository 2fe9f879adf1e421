"""Shared bits of the kernel tests: the device, relative errors, tolerances per dtype."""

from __future__ import annotations

import importlib.util

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: needs CUDA")

# Relative (norm-wise) error bounds vs a float64 reference. fp32 on a GPU: tl.dot uses TF32 (10-bit mantissa).
TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 5e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64."""
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()

# The interpreter turns 0-d numpy arrays into loop bounds, which numpy >= 1.25 flags on every iteration.
quiet_interpreter = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
