"""Tokenize text / JSONL corpora into train/val shards + index.json: `llm-dist prepare` from a checkout.

    python tools/prepare_data.py --input data/tinyshakespeare/input.txt --tokenizer byte \
        --out data/prepared/shakespeare_byte

The tool lives in llm_dist/data/prepare_cli.py (so that an installed wheel has it); see its docstring.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm_dist.data.prepare_cli import cli, main  # noqa: E402,F401 - main: for callers that import this script

if __name__ == "__main__":
    sys.exit(cli())
