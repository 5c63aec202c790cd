"""How every command ends: `sys.exit(exit_status(main))` in its `__main__` block.

Output piped into `head` (or a pager closed early) closes stdout while the command still writes: Python
then raises BrokenPipeError, and again when it flushes stdout at exit. That is not an error of the
command: it stops quietly, as the Python documentation recommends (stdout pointed at /dev/null, exit 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def exit_status(main: Callable[[], int | None]) -> int:
    try:
        status = main()
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not in the interpreter's final flush
        return status or 0
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
