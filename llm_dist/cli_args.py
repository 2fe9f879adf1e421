"""Command-line plumbing shared by every launcher and tool, light enough to import without torch.

- `ArgumentParser`: argparse with a one-line error (`prog: error: argument --x: ...`, exit 2) instead of
  the usage block plus the error, so bad input always reads as exactly one line on stderr.
- Argument types that check a value where it is parsed: `positive_int`, `nonnegative_int`,
  `finite_float(...)` (rejects nan/inf and values outside a range). argparse turns the ValueError they
  raise into "argument --flag: invalid ... value", naming the flag and the value.
- `one_line_errors(main, errors)`: runs a tool's `main`, printing any of `errors` as one `error: ...` line
  with exit status 2 (no traceback). `llm_dist.cli.tool_main` is this with the project's USER_ERRORS.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

EXIT_BAD_INPUT = 2


def one_line(msg: object) -> str:
    """Collapse a message onto one line (multi-line exception texts would break the one-line rule)."""
    return " ".join(str(msg).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line on stderr (exit 2); --help is unchanged.

    Subparsers made with `add_subparsers` are of the same class, so their errors are one line too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {one_line(message)}; see --help\n")


class _Checked:
    """A callable argparse `type` whose __name__ says what was expected (argparse prints it on failure)."""

    def __init__(self, name: str, fn: Callable[[str], object]) -> None:
        self.__name__ = name
        self._fn = fn

    def __call__(self, text: str) -> object:
        return self._fn(text)

    def __repr__(self) -> str:
        return self.__name__


def _int(text: str) -> int:
    return int(text.replace("_", ""))


def _positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise ValueError(text)
    return v


def _nonnegative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise ValueError(text)
    return v


positive_int = _Checked("positive integer (>= 1)", _positive_int)
nonnegative_int = _Checked("non-negative integer (>= 0)", _nonnegative_int)


def finite_float(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> _Checked:
    """An argparse type: a finite float in the interval [lo, hi] (`lo_open`/`hi_open` exclude the ends)."""
    left = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
    right = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
    what = " ".join(w for w in ("finite number", left, "and" if left and right else "", right) if w)

    def parse(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise ValueError(text)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ValueError(text)
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise ValueError(text)
        return v

    return _Checked(what, parse)


def max_processes() -> int:
    """The most worker processes a `--num-proc`-style setting may ask for: 4x this machine's CPUs (at least 8).
    More is never faster, and a typo such as 100000 would fork that many processes."""
    return max(8, 4 * (os.cpu_count() or 1))


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be used as an output directory ("<path> ..."), or None if it can. Touches nothing.

    It must be a directory or creatable as one: not an existing file, not below a file, not on a read-only
    or virtual filesystem (/proc, /sys: no storage behind them), writable by this user. URLs are not checked.
    """
    if "://" in str(path):
        return None
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{path} exists and is not a directory; expected a directory (or a new path)"
    anc = p.absolute()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        return f"{path} cannot be created: {anc} is a file, not a directory"
    st = os.statvfs(anc)
    if st.f_blocks == 0:
        return f"{path} is on a virtual filesystem ({anc}) that cannot hold files; expected a directory on a real disk"
    if st.f_flag & os.ST_RDONLY or not os.access(anc, os.W_OK | os.X_OK):
        return f"{path} is not writable ({anc} is read-only for this user)"
    return None


def one_line_errors(main: Callable[..., object], errors: tuple[type[BaseException], ...],
                    argv: list[str] | None = None) -> int:
    """`main(argv)`; any of `errors` becomes `error: <message>` (one line) on stderr and exit status 2.

    An int result is the exit status; anything else (None, a summary dict) means 0.
    """
    try:
        rc = main(argv)
    except errors as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0
