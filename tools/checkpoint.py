"""Inspect, consolidate and convert llm_dist checkpoints: `llm-dist checkpoint` from a checkout.

    python tools/checkpoint.py inspect runs/default
    python tools/checkpoint.py consolidate runs/default --out model.safetensors --check

The tool lives in llm_dist/checkpoint/cli.py (so that an installed wheel has it); see its docstring.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.checkpoint.cli import EXIT_BAD_INPUT, main  # noqa: E402,F401 - for callers that import this script

if __name__ == "__main__":
    sys.exit(main())
