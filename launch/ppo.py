"""PPO on a task with a checkable answer (or a trained reward model), from an SFT checkpoint.

    python launch/ppo.py --config configs/ppo_addition.yaml rl.init_from=runs/rl_demo/sft
    torchrun --nproc_per_node=N launch/ppo.py --config configs/ppo_addition.yaml rl.reward_model=runs/reward_addition
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist ppo`

if __name__ == "__main__":
    sys.exit(run_command("ppo"))
