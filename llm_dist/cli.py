"""Entry point shared by the launchers and the `llm-dist` command: parse + validate the config, run a stage,
map errors to exit codes.

`llm-dist <command> ARGS` (installed by pip) and `torchrun -m llm_dist.cli <command> ARGS` run the commands
of `COMMANDS` with the same ARGS as the launcher of the same name (`launch/pretrain.py ARGS`, ...): a stage
takes `[--config PATH|NAME] [key=value ...]`, a tool its own flags. Adding a command is one line there.

With `LLM_DIST_EXIT_FILE` set, every process also writes its exit code to that file. A job script needs it:
under torchrun a worker's exit code is lost (any non-zero worker exit becomes torchrun's own exit 1), yet
the script must tell "stopped by the scheduler's signal, checkpoint saved: requeue me" (75) from a finished
run (0), a bad config (2) or a crash (no code written). All ranks agree on 0/75 (the stop is a collective
vote), so which rank writes last does not matter. See slurm/common.sh.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Callable, Sequence

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
from llm_dist.stages import RunResult
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


def check_config(cfg: Config) -> Config:
    """Validate `cfg` for the launcher's world size, its device and output directories (ConfigError naming
    the key); returns it. Touches nothing."""
    cfg.validate(world_size_from_env())
    check_device(cfg.parallel.device, "parallel.device")
    check_output_dir(cfg.out_dir, "out_dir")
    if cfg.checkpoint.dir:
        check_output_dir(cfg.checkpoint.dir, "checkpoint.dir")
    return cfg


def exit_code(result: RunResult | int | None) -> int:
    """A stage's return value (a RunResult, or a bare exit code from older callers) as the exit status."""
    return result.exit_code if isinstance(result, RunResult) else int(result or 0)


def run(stage_main: Callable[[Config], RunResult | int | None], argv: list[str] | None = None,
        default_config: str | None = None) -> int:
    """Parse `[--config PATH|NAME] [key=value ...]`, validate for the launcher's world size, run the stage.

    A bad config prints one line and exits 2 before any process group, directory or file is touched; bad
    input found later (a missing data file, a corrupt tokenizer or checkpoint) also prints one line, exit 2.
    """
    try:
        cfg = check_config(parse_args(argv, default_config))
    except ConfigError as e:
        print(f"config error: {one_line(e)}", file=sys.stderr, flush=True)
        return report_exit(2)
    try:
        return report_exit(exit_code(stage_main(cfg)))
    except USER_ERRORS as e:  # bad input found after start-up (files, data, checkpoints): one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return report_exit(2)
    except ENV_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return report_exit(1)
    finally:
        release_all()  # the run directory's lock, whatever way the stage ended


@dataclass(frozen=True)
class Command:
    """One `llm-dist` subcommand: `target` is "module:function", imported only when the command runs."""

    target: str
    kind: str  # "stage": function(cfg) -> RunResult, run by `run` | "tool": function(argv) -> exit status
    help: str

    def load(self) -> Callable:
        module, _, name = self.target.partition(":")
        return getattr(import_module(module), name)


# The commands of `llm-dist` and `torchrun -m llm_dist.cli`; launch/<name>.py runs the entry of its name.
COMMANDS: dict[str, Command] = {
    "pretrain": Command("llm_dist.pretrain:main", "stage", "pretrain a decoder-only transformer"),
    "sft": Command("llm_dist.sft.stage:main", "stage", "supervised fine-tuning on chat-formatted JSONL"),
    "reward": Command("llm_dist.reward.stage:main", "stage", "train a reward model on preference pairs"),
    "dpo": Command("llm_dist.align.stage:main", "stage", "DPO / IPO / hinge / SimPO on preference pairs"),
    "ppo": Command("llm_dist.rl.stage:ppo_main", "stage", "PPO from an SFT checkpoint"),
    "grpo": Command("llm_dist.rl.stage:main", "stage", "GRPO from an SFT (or pretraining) checkpoint"),
    "generate": Command("llm_dist.sample:main", "tool", "sample text from a checkpoint"),
    "evaluate": Command("llm_dist.eval.evaluate:main", "tool", "loss / perplexity / multiple-choice accuracy"),
    "prepare": Command("llm_dist.data.prepare_cli:cli", "tool", "tokenize corpora into train/val shards"),
    "tokenizer": Command("llm_dist.tokenizer.train_cli:cli", "tool", "train a byte-level BPE tokenizer"),
    "checkpoint": Command("llm_dist.checkpoint.cli:main", "tool", "inspect, consolidate, convert checkpoints"),
}


def run_command(name: str, argv: Sequence[str] | None = None) -> int:
    """Run command `name` with `argv` (None: sys.argv[1:], as a launcher script gets them)."""
    cmd = COMMANDS[name]
    args = None if argv is None else list(argv)
    if cmd.kind == "stage":
        return run(cmd.load(), args)
    return int(cmd.load()(args) or 0)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: llm-dist <command> [ARGS ...]   (under torchrun: torchrun ... -m llm_dist.cli <command> ...)",
             "", "commands (`llm-dist <command> --help` for each one's ARGS):"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "Stages take [--config PATH|NAME] [key=value ...]; NAME is a shipped config (e.g. debug)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`llm-dist <command> ARGS`: the console script installed by pip (pyproject [project.scripts])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"llm-dist: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, [f"llm-dist {name}", *rest]  # argparse's usage lines then name the subcommand
    try:
        return run_command(name, rest)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(main())
