"""GRPO on a task with a checkable answer, from an SFT (or pretraining) checkpoint.

    python launch/grpo.py --config configs/grpo_addition.yaml rl.init_from=runs/rl_demo/sft
    torchrun --nproc_per_node=N launch/grpo.py --config configs/grpo_addition.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist grpo`

if __name__ == "__main__":
    sys.exit(run_command("grpo"))
