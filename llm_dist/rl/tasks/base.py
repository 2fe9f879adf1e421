"""The task interface: deterministic items per (split, index), a reward for a completion, SFT rows."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskItem:
    """One problem: the user prompt and the reference answer."""

    prompt: str
    answer: str


def stable_hash(*parts: object) -> int:
    """A process-independent 64-bit hash (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class Task:
    """Base class. Subclasses implement `item` and `reward`; items depend only on (split, index)."""

    name = "task"

    def item(self, index: int, split: str) -> TaskItem:
        """Problem `index` of split 'train' or 'eval' (the splits never share a problem)."""
        raise NotImplementedError

    def reward(self, completion: str, item: TaskItem) -> float:
        """1.0 for a correct completion, else 0.0 (subclasses may give partial credit)."""
        raise NotImplementedError

    def num_items(self, split: str) -> int | None:
        """How many distinct items a split has (None = practically unbounded, generated on demand)."""
        return None

    def items(self, split: str, n: int, start: int = 0) -> list[TaskItem]:
        return [self.item(start + i, split) for i in range(n)]

    def sft_rows(self, n: int, start: int = 0) -> list[dict]:
        """A warm-up set: {"prompt", "response"} rows of train items with their reference answers."""
        return [{"prompt": it.prompt, "response": it.answer} for it in self.items("train", n, start)]

    def wrong_answer(self, item: TaskItem, rng: random.Random) -> str:
        """A plausible but wrong answer to `item` (the rejected side of a preference pair)."""
        raise NotImplementedError

    def preference_rows(self, n: int, start: int = 0, split: str = "train") -> list[dict]:
        """{"prompt", "chosen", "rejected"} rows: the reference answer preferred to a wrong one.

        Deterministic per (task, split, index), like the items, so a file can be regenerated exactly.
        """
        rows = []
        for i, it in enumerate(self.items(split, n, start)):
            rng = random.Random(stable_hash("preference", self.name, split, start + i))
            rows.append({"prompt": it.prompt, "chosen": it.answer, "rejected": self.wrong_answer(it, rng)})
        return rows
