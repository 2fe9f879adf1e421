"""Entry point shared by the launchers: parse + validate the config, run a stage, map errors to exit codes."""

from __future__ import annotations

import sys
from typing import Callable

from llm_dist.checkpoint.sharded import CheckpointReadError
from llm_dist.config import Config, ConfigError, parse_args
from llm_dist.data.index import DataIndexError
from llm_dist.data.sources import DataPrepError
from llm_dist.distributed import world_size_from_env
from llm_dist.tokenizer import TokenizerFileError

# Errors that describe bad input (a file, a key, a value) in one line: shown without a traceback.
USER_ERRORS = (ConfigError, DataPrepError, DataIndexError, TokenizerFileError, CheckpointReadError)


def run(stage_main: Callable[[Config], int | None], argv: list[str] | None = None,
        default_config: str | None = None) -> int:
    """Parse `[--config PATH] [key=value ...]`, validate for the launcher's world size, run the stage.

    A bad config prints one line and exits 2 before any process group, directory or file is touched; bad
    input found later (a missing data file, a corrupt tokenizer or checkpoint) also prints one line, exit 2.
    """
    try:
        cfg = parse_args(argv, default_config).validate(world_size_from_env())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        return int(stage_main(cfg) or 0)
    except USER_ERRORS as e:  # bad input found after start-up (files, data, checkpoints): one line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
