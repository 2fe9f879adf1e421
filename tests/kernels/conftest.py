"""Kernel tests: a fixed seed per test. (TRITON_INTERPRET is set in the root tests/conftest.py, before any test
module can import a kernel module; with CUDA the kernels are compiled and run on the GPU instead.)"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
