"""How the experiment commands refuse bad input: one `error:` line on stderr and exit status 2."""

from __future__ import annotations

import sys


class InputError(SystemExit):
    """A problem with a command's inputs (preset, flags, grid folder). Raised before anything is written;
    `str()` is the message, the exit status is 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message if message.startswith("error:") else f"error: {message}"

    def __str__(self) -> str:
        return self.message


def reported(main):
    """Decorate a command's `main`: an InputError prints its one line, then exits 2."""

    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as error:
            print(error.message, file=sys.stderr)
            raise

    wrapper.__doc__, wrapper.__name__, wrapper.__wrapped__ = main.__doc__, main.__name__, main
    return wrapper
