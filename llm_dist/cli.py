"""Entry point shared by the launchers: parse + validate the config, run a stage, map errors to exit codes.

With `LLM_DIST_EXIT_FILE` set, every process also writes its exit code to that file. A job script needs it:
under torchrun a worker's exit code is lost (any non-zero worker exit becomes torchrun's own exit 1), yet
the script must tell "stopped by the scheduler's signal, checkpoint saved: requeue me" (75) from a finished
run (0), a bad config (2) or a crash (no code written). All ranks agree on 0/75 (the stop is a collective
vote), so which rank writes last does not matter. See slurm/common.sh.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from llm_dist.checkpoint.manager import CheckpointWriteError
from llm_dist.checkpoint.sharded import CheckpointReadError
from llm_dist.cli_args import one_line, one_line_errors, output_dir_problem
from llm_dist.config import Config, ConfigError, parse_args
from llm_dist.data.index import DataIndexError
from llm_dist.data.sources import DataPrepError
from llm_dist.distributed import pick_device, read_launch_env, world_size_from_env
from llm_dist.eval.multiple_choice import MCFormatError
from llm_dist.run_lock import RunLockError, release_all
from llm_dist.sft.chat import DataError
from llm_dist.tokenizer import TokenizerFileError

# Errors that describe bad input (a file, a key, a value) in one line: shown without a traceback.
USER_ERRORS = (ConfigError, DataPrepError, DataIndexError, TokenizerFileError, CheckpointReadError, RunLockError,
               MCFormatError, DataError)
# Errors of the machine, not of the input (a full disk): one line too, exit 1; the partial write is removed.
ENV_ERRORS = (CheckpointWriteError,)


EXIT_FILE_ENV = "LLM_DIST_EXIT_FILE"


def report_exit(code: int) -> int:
    """Write `code` to $LLM_DIST_EXIT_FILE (atomically: a reader never sees half a file); returns `code`."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{code}\n")
        os.replace(tmp, p)
    return code


def tool_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a tool's `main(argv)`: any USER_ERRORS becomes one `error: ...` line on stderr and exit status 2."""
    return one_line_errors(main, USER_ERRORS, argv)


def check_device(device: str, key: str) -> None:
    """`device` (auto | cpu | cuda) can be used on this machine by this rank; else ConfigError naming `key`."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{key}: {device!r} is not one of auto, cpu, cuda")
    try:
        pick_device(device, read_launch_env().local_rank, key)  # the same checks the run itself makes
    except RuntimeError as e:
        raise ConfigError(str(e)) from None


def check_output_dir(path: str, key: str) -> None:
    """A local output directory that exists, or can be created, and can hold files; else ConfigError naming
    `key`. Touches nothing. URLs (s3://...) are left to their filesystem."""
    problem = output_dir_problem(path)
    if problem:
        raise ConfigError(f"{key}: {problem}")


def run(stage_main: Callable[[Config], int | None], argv: list[str] | None = None,
        default_config: str | None = None) -> int:
    """Parse `[--config PATH] [key=value ...]`, validate for the launcher's world size, run the stage.

    A bad config prints one line and exits 2 before any process group, directory or file is touched; bad
    input found later (a missing data file, a corrupt tokenizer or checkpoint) also prints one line, exit 2.
    """
    try:
        cfg = parse_args(argv, default_config).validate(world_size_from_env())
        check_device(cfg.parallel.device, "parallel.device")
        check_output_dir(cfg.out_dir, "out_dir")
        if cfg.checkpoint.dir:
            check_output_dir(cfg.checkpoint.dir, "checkpoint.dir")
    except ConfigError as e:
        print(f"config error: {one_line(e)}", file=sys.stderr, flush=True)
        return report_exit(2)
    try:
        return report_exit(int(stage_main(cfg) or 0))
    except USER_ERRORS as e:  # bad input found after start-up (files, data, checkpoints): one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return report_exit(2)
    except ENV_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return report_exit(1)
    finally:
        release_all()  # the run directory's lock, whatever way the stage ended
