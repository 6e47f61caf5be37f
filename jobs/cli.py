"""What every job's ``main`` shares: user errors as one line and exit code 2, never a traceback."""

from __future__ import annotations

import sys


def fail(error: BaseException, prog: str = "") -> int:
    """Prints ``error`` as one line on stderr and returns the exit code for a user error (2)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"{prog + ': ' if prog else ''}error: {text}", file=sys.stderr)
    return 2
