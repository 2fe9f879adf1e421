"""Session fixtures shared by the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.fixture(scope="session")
def prepared_byte_data(tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared with the byte tokenizer once per session (about a second)."""
    from llm_dist.data.prepare import ensure_prepared
    from llm_dist.tokenizer import ByteTokenizer

    out = tmp_path_factory.mktemp("data") / "shakespeare_byte"
    ensure_prepared(out, str(REPO / "data/tinyshakespeare/input.txt"), ByteTokenizer(), 0.1, log=lambda *a: None)
    return out
