"""Kernel tests run the Triton kernels in Triton's CPU interpreter when there is no GPU.

Triton fixes interpreted-vs-compiled when `@triton.jit` decorates a kernel, i.e. when a kernel module is
first imported; nothing imports those modules at collection time (the model imports them lazily, at its
first Triton call), so setting the variable here, while pytest collects this directory, is early enough.
The flag only changes how `triton.jit` functions are built: torch (including inductor's CPU code
generation) does not read it. With CUDA the kernels are compiled and run on the GPU instead.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
