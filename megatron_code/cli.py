"""What a command-line tool does with a user error its own checks did not catch: a path that
cannot be read or written (an output folder under a file, no permission, a full disk) stops it
with one line naming the path and exit status 1, not a traceback."""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def user_errors(*kinds: type[Exception]):
    """Inside it, an OSError or an exception of `kinds` ends the program with one line."""
    try:
        yield
    except OSError as e:
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}")
    except kinds as e:
        sys.exit(f"error: {e}")
