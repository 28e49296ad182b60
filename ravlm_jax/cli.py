"""What the command-line entry points share: bad input and expected failures end in one
line on stderr and a non-zero exit, never a traceback (set RAVLM_DEBUG=1 to see one)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

EXPECTED = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError,
            RuntimeError, OSError)


def run_cli(fn: Callable[[], object], prog: str) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # tfds/grain log through absl; their per-call notices are noise here
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass
    try:
        result = fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as e:
        if os.environ.get("RAVLM_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = msg.strip("'\"")
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0
