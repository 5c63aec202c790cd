"""One writer per run folder: `RunLock` holds an exclusive `flock` on `<run folder>/.lock` for the run's
whole life (the lock file holds the owner's PID). A second process on the same folder stops at once (exit 2)
naming that PID; a lock left by a dead process is taken over (the kernel drops a dead process's flock), so a
SIGKILL never wedges a folder. `lock_holder` asks without taking it (ablate does). No torch here."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from train.run.state import RunFolderError

LOCK_NAME = ".lock"


class RunFolderBusy(RunFolderError):
    """Another live process holds the run folder's lock."""


def _holder_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


class RunLock:
    """Exclusive ownership of a run folder for as long as the run lives (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        for _ in range(10):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusy(
                    f"{self.run_dir} is being written by process {_holder_pid(self.path)} (a run of the same "
                    "settings); wait for it to end, or stop it, then start again (add --resume to continue it)"
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the lock file we opened was removed by its last owner meanwhile: take the new one
        else:
            raise RunFolderBusy(f"{self.run_dir}: its lock file keeps changing; another process is starting it")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(run_dir: Path) -> str | None:
    """The PID holding `run_dir`'s lock, or None when no live process holds it (the lock is not taken)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_pid(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
