"""Session fixtures shared by the test suite, and the Triton interpreter switch.

Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton decides interpreted-vs-compiled
when a `@triton.jit` function is created, i.e. when a kernel module is imported, and test modules anywhere
in the suite may import one (through the model) while pytest collects them; so the variable is set here,
in the root conftest, before any test module is imported. It only changes how `triton.jit` functions are
built: torch (including inductor's CPU code generation) does not read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def prepared_byte_data(tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared with the byte tokenizer once per session (about a second)."""
    from llm_dist.data.prepare import ensure_prepared
    from llm_dist.tokenizer import ByteTokenizer

    out = tmp_path_factory.mktemp("data") / "shakespeare_byte"
    ensure_prepared(out, str(REPO / "data/tinyshakespeare/input.txt"), ByteTokenizer(), 0.1, log=lambda *a: None)
    return out
