"""Evaluate a checkpoint: loss / perplexity / bits per byte on a prepared split, multiple-choice accuracy.

    python launch/evaluate.py --checkpoint runs/default --mc data/tinyshakespeare/mc_val.jsonl
    torchrun --nproc_per_node=2 launch/evaluate.py --checkpoint runs/default --split val
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist evaluate`

if __name__ == "__main__":
    sys.exit(run_command("evaluate"))
