"""Pretrain a decoder-only transformer.

    python launch/pretrain.py                                   # Tiny Shakespeare, byte-level, CPU or one GPU
    torchrun --nproc_per_node=N launch/pretrain.py --config configs/gpt2_124m.yaml optim.lr=3e-4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist pretrain`

if __name__ == "__main__":
    sys.exit(run_command("pretrain"))
