"""Train a byte-level BPE tokenizer on text files: `llm-dist tokenizer` from a checkout.

    python tools/train_tokenizer.py data/tinyshakespeare/input.txt --vocab-size 1024 --out runs/tok.json

The tool lives in llm_dist/tokenizer/train_cli.py (so that an installed wheel has it); see its docstring.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.tokenizer.train_cli import cli, main  # noqa: E402,F401 - main: for callers that import this script

if __name__ == "__main__":
    sys.exit(cli())
