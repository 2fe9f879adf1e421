"""Train a reward model on preference pairs ({"prompt","chosen","rejected"} or HH transcripts).

    python launch/reward.py --config configs/reward_addition.yaml reward.init_from=runs/rl_demo/sft
    torchrun --nproc_per_node=N launch/reward.py --config configs/reward_addition.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist reward`

if __name__ == "__main__":
    sys.exit(run_command("reward"))
