"""GSM8K as an RL task: the reward checks the number after '####' (commas stripped) against the reference.

Train items are data/gsm8k/train.jsonl, eval items test.jsonl (MIT, see data/gsm8k/README.md).
"""

from __future__ import annotations

import random

from llm_dist.rl.tasks.base import Task, TaskItem
from llm_dist.sft.chat import answers_match, extract_answer, read_jsonl
from llm_dist.stages import resolve_path


def gsm8k_reward(completion: str, reference_answer: str) -> float:
    """1.0 when the completion's '#### n' equals the reference's (commas, '$' and trailing '.0' ignored)."""
    return 1.0 if answers_match(completion, reference_answer, "gsm8k") else 0.0


class GSM8KTask(Task):
    name = "gsm8k"

    def __init__(self, data_dir: str = "data/gsm8k") -> None:
        root = resolve_path(data_dir)
        self._rows = {split: [TaskItem(c.messages[0]["content"], c.reference)
                              for c in read_jsonl(f"{root}/{fname}")]
                      for split, fname in (("train", "train.jsonl"), ("eval", "test.jsonl"))}

    def num_items(self, split: str) -> int | None:
        return len(self._rows[split])

    def item(self, index: int, split: str) -> TaskItem:
        rows = self._rows[split]
        return rows[index % len(rows)]  # cycles: RL may run more steps than there are problems

    def reward(self, completion: str, item: TaskItem) -> float:
        return gsm8k_reward(completion, item.answer)

    def wrong_answer(self, item: TaskItem, rng: random.Random) -> str:
        """The reference solution with its final '#### n' changed to a nearby wrong number."""
        want = extract_answer(item.answer, "gsm8k")
        value = float(want) if want is not None else 0.0
        wrong = value + rng.choice((-1, 1)) * rng.choice((1, 2, 10, max(1.0, abs(value) * 0.5)))
        text = str(int(wrong)) if float(wrong).is_integer() else f"{wrong:.2f}"
        head = item.answer.rsplit("####", 1)[0]
        return f"{head}#### {text}"
