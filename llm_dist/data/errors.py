"""The error type of data preparation (kept apart so formats, readers and sources can all raise it)."""

from __future__ import annotations


class DataPrepError(ValueError):
    """Bad input for data preparation; the message is a single line naming the file/line/key at fault."""
