"""What a command-line tool does with a user error its own checks did not catch: a path that
cannot be read or written (an output folder under a file, no permission, a full disk), a damaged
checkpoint or weights file, stops it with one line naming the path and exit status 1, not a
traceback. `--debug` (tools that take it) or MEGATRON_CODE_DEBUG=1 shows the traceback instead."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

DEBUG_VARIABLE = "MEGATRON_CODE_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


class _Debug(argparse.Action):
    """--debug sets MEGATRON_CODE_DEBUG=1, so every handler of this process (and the ranks
    torchrun starts with the same arguments) shows tracebacks."""

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[DEBUG_VARIABLE] = "1"
        setattr(namespace, self.dest, True)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action=_Debug, nargs=0, default=False,
                        help=f"show the traceback of an error instead of one line (also {DEBUG_VARIABLE}=1)")


def one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"error: {error.filename}: {error.strerror}"
    return f"error: {error}"


def user_error(error: BaseException) -> int:
    """Inside an `except` block: print the error as one line on stderr and return exit status 1;
    under --debug, raise it again with its traceback."""
    if debugging():
        raise error
    print(one_line(error), file=sys.stderr)
    return 1


@contextlib.contextmanager
def user_errors(*kinds: type[Exception]):
    """Inside it, an OSError or an exception of `kinds` ends the program with one line."""
    try:
        yield
    except (OSError, *kinds) as e:
        if debugging():
            raise
        sys.exit(one_line(e))
