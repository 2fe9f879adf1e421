"""GSM8K as an RL task: the reward checks the number after '####' (commas stripped) against the reference.

Train items are data/gsm8k/train.jsonl, eval items test.jsonl (MIT, see data/gsm8k/README.md).
"""

from __future__ import annotations

from llm_dist.rl.tasks.base import Task, TaskItem
from llm_dist.sft.chat import answers_match, read_jsonl
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
