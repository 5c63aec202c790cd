"""Progress that never goes quiet: a tqdm bar on a terminal; elsewhere (a log file, a scheduler, `nohup`)
a plain line at least every `GPT2_PROGRESS_SECONDS` seconds (default 10) while work runs.

    with console.phase("sst: predicting 1101 dev examples", total=len(batches)) as work:
        for batch in batches:
            ...
            work.advance()

One heartbeat thread serves every phase of the process. When the interval passes with no line from
this module (`say`, or a heartbeat), it prints the innermost running phase's state, e.g.
`sst: predicting 1101 dev examples: 12/35 batches (24 s)`. Work that ends within the interval adds
no line (the silence is counted from the last line, or from when work began after a quiet spell).
A long single item (one slow step, one model load) still gets its lines, because the heartbeat does
not wait for the work to advance. Only one rank of a run shows progress: the others pass
`enabled=False`. On a terminal, `say` writes above the bars instead of gluing onto them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

from tqdm import tqdm

INTERVAL_ENV = "GPT2_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 10.0
BAR_DELAY = 2.0  # seconds of work before a terminal's bar appears

_lock = threading.RLock()
_running: list[Phase] = []  # the phases of this process now running, innermost last
_state = {"last_line": time.monotonic(), "thread": None}


def interval() -> float:
    """Seconds between two lines at most, off a terminal (`GPT2_PROGRESS_SECONDS`, default 10)."""
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        value = DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def on_terminal() -> bool:
    return sys.stderr.isatty()


def say(text: str, file=None) -> None:
    """A line on stderr (or `file`), above any bar on a terminal; it counts as the process's latest
    sign of life."""
    file = file or sys.stderr
    with _lock:
        if on_terminal() and _running:
            tqdm.write(text, file=file)  # clears the bars, writes the line, redraws them
        else:
            print(text, file=file, flush=True)
        _state["last_line"] = time.monotonic()


class Phase:
    """A stretch of work with a name and, when known, a total. Use it as a context manager."""

    def __init__(
        self,
        name: str,
        total: int | None = None,
        enabled: bool = True,
        initial: int = 0,
        unit: str = "",
        status: Callable[[], str] | None = None,
        **bar,
    ) -> None:
        """`status`: called for each heartbeat line, to say what is happening (e.g. the jobs running)."""
        self.name, self.total, self.done, self.enabled, self.unit = name, total, initial, enabled, unit
        self.status = status
        self.activity = ""  # what it is doing now, shown in its line (e.g. "loading the model")
        self.started = time.monotonic()
        terminal = enabled and on_terminal()
        # a bar appears once the work has lasted 2 s: a quick phase (a parse that ends in --help or an
        # error line) draws nothing on the terminal
        bar = {"leave": False, "mininterval": 0.5, "unit": unit or "it", "delay": BAR_DELAY, **bar}
        self.bar = tqdm(total=total, initial=initial, desc=name[:40], disable=not terminal, file=sys.stderr, **bar)

    def advance(self, count: int = 1) -> None:
        self.done += count
        self.bar.update(count)

    def set(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done

    def doing(self, activity: str) -> None:
        """Name the current part of the work (shown in the next line, and on a terminal's bar)."""
        self.activity = activity
        self.bar.set_description_str(f"{self.name[:40]} ({activity})" if activity else self.name[:40])

    def line(self) -> str:
        count = f"{self.done}/{self.total}{' ' + self.unit if self.unit else ''}" if self.total is not None else ""
        parts = [count, self.activity, self.status() if self.status is not None else ""]
        middle = ", ".join(part for part in parts if part)
        seconds = f"({time.monotonic() - self.started:.0f} s)"
        return f"{self.name}: {middle} {seconds}" if middle else f"{self.name} {seconds}"

    def __enter__(self) -> Phase:
        if not self.enabled:
            return self
        with _lock:
            if not _running:  # the silence counted from here: a short phase alone adds no line
                _state["last_line"] = max(_state["last_line"], time.monotonic())
            _running.append(self)  # (on a terminal too: `say` writes above its bar)
            thread = _state["thread"]
            if not on_terminal() and (thread is None or not thread.is_alive()):
                thread = threading.Thread(target=_heartbeat, name="progress-heartbeat", daemon=True)
                _state["thread"] = thread
                thread.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        with _lock:
            if self in _running:
                _running.remove(self)
        self.bar.close()


phase = Phase  # `with console.phase(...)` reads as what it is


def command(name: str):
    """Decorate a command's `main`: the whole command is one phase (rank 0's), so the silence is counted
    from its start whatever runs inside, and the phases inside name the details."""

    def decorate(main):
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            with Phase(name, enabled=os.environ.get("RANK", "0") == "0"):
                return main(*args, **kwargs)

        return wrapper

    return decorate


def doing(activity: str) -> None:
    """Name the current part of the innermost running phase's work (nothing when none runs)."""
    with _lock:
        if _running:
            _running[-1].doing(activity)


def _heartbeat() -> None:
    """Print the innermost phase's line whenever the interval passes without a line; stop when no
    phase runs (the next phase starts a new thread)."""
    while True:
        every = interval()
        time.sleep(min(1.0, every / 4))
        with _lock:
            if not _running:
                _state["thread"] = None
                return
            if time.monotonic() - _state["last_line"] >= every:
                print(_running[-1].line(), file=sys.stderr, flush=True)
                _state["last_line"] = time.monotonic()


class _CurrentStderr(logging.StreamHandler):
    """A log handler that writes to whatever sys.stderr is when it writes (a grid job run in process
    has its own log file), not to the stream that was current when logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr(level: int) -> None:
    """Log records as `LEVEL logger: message` lines on the current stderr (once per process)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[_CurrentStderr()])
