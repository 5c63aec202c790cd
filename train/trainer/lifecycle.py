"""How a run stops early: interruption by SIGINT/SIGTERM (a checkpoint, then exit 130 / 143) and the
divergence guard (exit 3). The run folder's rules are train/run/folder.py's, its states train/run/state.py's."""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

EXIT_DIVERGED = 3
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell convention


class RunStopped(Exception):
    """Every way `train.fit` ends without finishing a run; `exit_status` is what the command line exits
    with for it."""

    exit_status = 1


class BadInput(RunStopped, ValueError):
    """A flag, a file or a folder the run cannot use (one line says which and why); nothing was trained
    that a rerun with the input fixed would not redo."""

    exit_status = 2


class TrainingDiverged(RunStopped, RuntimeError):
    """A non-finite loss; the last healthy checkpoint is kept and diverged.json says where."""

    exit_status = EXIT_DIVERGED


class Interrupted(RunStopped):
    """SIGINT/SIGTERM arrived; the loop saved a checkpoint (or had nothing to save) and stopped."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = EXIT_STATUS.get(signum, 128 + signum)


# ---------------------------------------------------------------- signals


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`; the loop checks it after every step,
    saves a checkpoint and raises Interrupted. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    # the last signal any StopSignals of this process received: a grid running jobs in its own process
    # learns from it that a job was signalled (experiments/jobs.py), even when the run finished anyway
    last_received: int | None = None

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def at_once(self, message: Callable[[int], str]):
        """While active, a signal raises Interrupted(message(signum)) at once: for work after the last
        checkpoint that a resume simply redoes (the test prediction). One received before it began does
        not: the run was complete, so it finishes."""
        self._at_once = message
        try:
            yield
        finally:
            self._at_once = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = StopSignals.last_received = signum
        if getattr(self, "_at_once", None) is not None:
            raise Interrupted(signum, self._at_once(signum))
        print(
            f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            f"(Ctrl-C again to stop at once, unsaved)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            self._previous_hook = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def _unraisable(self, info: Any) -> None:
        """The second Ctrl-C's KeyboardInterrupt can land inside a finaliser (a progress bar's `__del__`
        during garbage collection), where Python prints it as "Exception ignored ... Traceback" and goes
        on: raise it again in the main thread, where it stops the run as it should, with no traceback."""
        if isinstance(info.exc_value, KeyboardInterrupt):
            import _thread

            _thread.interrupt_main()
            return
        self._previous_hook(info)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._previous:
            sys.unraisablehook = self._previous_hook


# ---------------------------------------------------------------- divergence


class DivergenceGuard:
    """Judges each step's loss, per task (their scales differ), from the first step on:
    * non-finite, or a **blow-up** (above `blowup_factor` times the larger of the task's first loss and
      ln(vocabulary size), the loss of a uniform guess over the vocabulary): the run stops (exit 3);
    * a **spike** (above `spike_factor` times the median of the last `window` healthy losses, judged once
      `warmup` of them exist): reported, and the checkpoint whose weights produced it is not kept.
    A blow-up needs no history, so `--lr 1e3` (loss 1.6 -> 7e6 at step 2) stops at step 2."""

    def __init__(
        self, spike_factor: float, blowup_factor: float = 0.0, floor: float = 0.0, window: int = 100, warmup: int = 5
    ) -> None:
        self.factor, self.warmup = spike_factor, warmup
        self.blowup_factor, self.floor = blowup_factor, floor
        self.window = window
        self.healthy: dict[str, deque] = {}
        self.first: dict[str, float] = {}

    def check(self, task: str, loss: float) -> tuple[str, bool] | None:
        """None when healthy, else (what is wrong, whether the run must stop)."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})", True
        reference = max(self.first.setdefault(task, loss), self.floor)
        if self.blowup_factor and loss > self.blowup_factor * reference:
            return (
                f"loss blow-up ({loss:.4g}, more than {self.blowup_factor:g}x max(first loss "
                f"{self.first[task]:.4g}, ln(vocab) {self.floor:.4g}))",
                True,
            )
        history = self.healthy.setdefault(task, deque(maxlen=self.window))
        if self.factor and len(history) >= self.warmup:
            median = statistics.median(history)
            if loss > self.factor * median:
                return f"loss spike ({loss:.4g}, more than {self.factor:g}x the running median {median:.4g})", False
        history.append(loss)
        return None
