"""Entry point shared by the launchers: parse + validate the config, run a stage, map errors to exit codes."""

from __future__ import annotations

import sys
from typing import Callable

from llm_dist.config import Config, ConfigError, parse_args
from llm_dist.distributed import world_size_from_env


def run(stage_main: Callable[[Config], int | None], argv: list[str] | None = None,
        default_config: str | None = None) -> int:
    """Parse `[--config PATH] [key=value ...]`, validate for the launcher's world size, run the stage.

    A bad config prints one line and exits 2 before any process group, directory or file is touched.
    """
    try:
        cfg = parse_args(argv, default_config).validate(world_size_from_env())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return int(stage_main(cfg) or 0)
