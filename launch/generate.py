"""Sample from a trained checkpoint.

    python launch/generate.py --checkpoint runs/default --prompt "ROMEO:" --num-samples 2 --top-p 0.9
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.cli import run_command  # noqa: E402 - the same command as `llm-dist generate`

if __name__ == "__main__":
    sys.exit(run_command("generate"))
