"""Supervised fine-tuning on chat-formatted JSONL (prompt/response, messages, or GSM8K question/answer).

    python launch/sft.py --config configs/sft_gsm8k.yaml sft.init_from=runs/pretrain
    torchrun --nproc_per_node=N launch/sft.py --config configs/sft_gsm8k.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist sft`

if __name__ == "__main__":
    sys.exit(run_command("sft"))
