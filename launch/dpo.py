"""Align a policy on preference pairs with DPO, IPO, hinge or SimPO (`dpo.loss`), against its frozen initial self.

    python launch/dpo.py --config configs/dpo_addition.yaml dpo.init_from=runs/rl_demo/sft
    torchrun --nproc_per_node=N launch/dpo.py --config configs/dpo_addition.yaml parallel.strategy=fsdp
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist dpo`

if __name__ == "__main__":
    sys.exit(run_command("dpo"))
