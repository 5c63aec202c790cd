"""A run folder's life: what state it is in, when it may be (re)started or resumed, interruption by
SIGINT/SIGTERM, and the divergence guard.

States of `<out_dir>/<run name>/`:
* new          nothing there yet;
* dead         started, but stopped before its first checkpoint (config.json / log.jsonl only);
* interrupted  has a `last` checkpoint and no metrics.json (killed, preempted, Ctrl-C);
* finished     metrics.json written (its runs.tsv row exists).
A fresh start refuses any state but `new` unless `--overwrite` (which clears the folder and its
runs.tsv row first); `--resume` continues `interrupted`, restarts `dead` from step 0, and does
nothing for `finished` (unless `--extend_epochs N`).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import statistics
import sys
from collections import deque
from pathlib import Path
from typing import Any

from train import checkpoint as ckpt
from train.runs import drop_runs_row, log_entries
from train.spec import flat_identity

EXIT_DIVERGED = 3
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell convention


class RunFolderError(ValueError):
    """A run folder that cannot be started or resumed as asked; the message says what to pass."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the last healthy checkpoint is kept and diverged.json says where."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the loop saved a checkpoint (or had nothing to save) and stopped."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = EXIT_STATUS.get(signum, 128 + signum)


# ---------------------------------------------------------------- folder state


def folder_state(run_dir: Path) -> str:
    if (run_dir / "metrics.json").is_file():
        return "finished"
    if (run_dir / "checkpoints" / "last.json").is_file():
        return "interrupted"
    if run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):  # the lock alone is no run
        return "dead"
    return "new"


def logged_steps(run_dir: Path) -> int:
    """The last step log.jsonl reached (0 when none)."""
    return max((step for _, step in log_entries(run_dir / "log.jsonl")), default=0)


def read_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir} has no config.json; it is not a run folder of this code") from None
    except ValueError as error:
        raise RunFolderError(f"{path} is corrupt ({error}); pass --overwrite to start the run again") from None


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'--flag: run value -> value now' for every result-changing setting that differs."""
    # compared as stored in config.json (JSON: tuples become lists)
    a, b = (json.loads(json.dumps(flat_identity(x), default=str)) for x in (saved, now))
    return [
        f"--{k}: {a.get(k)!r} in the run, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]


def closest_run(out_dir: Path, identity: dict[str, Any], seed: int) -> tuple[Path, list[str]] | None:
    """The run folder under `out_dir` (same task and seed) whose settings differ least from `identity`."""
    best = None
    for config_file in sorted(out_dir.glob("*/config.json")):
        try:
            record = json.loads(config_file.read_text())
        except ValueError:
            continue
        saved = record.get("identity")
        if not saved or saved.get("label") != identity["label"] or record.get("training", {}).get("seed") != seed:
            continue
        diffs = differences(saved, identity)
        if best is None or len(diffs) < len(best[1]):
            best = (config_file.parent, diffs)
    return best


def clear_run_folder(run_dir: Path) -> None:
    """What --overwrite removes: every file the run wrote (logs, checkpoints, predictions, wandb); the
    lock file stays, since this process holds it (train/run.py)."""
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name == ".lock":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def refuse_fresh_start(run_dir: Path, state: str) -> RunFolderError:
    if state == "finished":
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return RunFolderError(
            f"{run_dir} holds a finished run (selection score {metrics.get('selection_score')} at step "
            f"{metrics.get('best_step')}); pass --overwrite to train it again, or --resume --extend_epochs N "
            f"to train it further"
        )
    if state == "interrupted":
        step = json.loads((run_dir / "checkpoints" / "last.json").read_text()).get("step")
        return RunFolderError(
            f"{run_dir} holds an interrupted run (last checkpoint at step {step}); pass --resume to continue "
            f"it or --overwrite to start it again"
        )
    return RunFolderError(
        f"{run_dir} holds a run that stopped at step {logged_steps(run_dir)} before its first checkpoint; "
        f"pass --resume (or --overwrite) to start it again from step 0"
    )


def check_run_folder(run_dir: Path, state: str, spec: Any, main_process: bool) -> dict | None:
    """Enforce the start/resume rules (module docstring); returns the saved record of a run that is
    resumed, None for a fresh start (after --overwrite cleared the folder)."""
    out, identity = spec.output, spec.identity()
    if out.extend_epochs and spec.training.max_steps:
        raise RunFolderError("--extend_epochs cannot extend a run limited by --max_steps")
    if out.resume:
        if state == "new":
            closest = closest_run(Path(out.out_dir), identity, spec.seed)
            if closest is not None and closest[1]:
                folder, diffs = closest
                raise RunFolderError(
                    f"--resume: no run with these settings in {out.out_dir} ({run_dir.name}); the closest, "
                    f"{folder.name}, differs in: " + "; ".join(diffs)
                )
            raise RunFolderError(f"--resume: no run {run_dir.name} in {out.out_dir} to resume")
        saved = read_record(run_dir)
        if "identity" in saved and (diffs := differences(saved["identity"], identity)):
            raise RunFolderError(f"--resume: {run_dir} was run with other settings: " + "; ".join(diffs))
        if state == "dead":  # nothing to continue: start again from step 0 with a clean folder
            if main_process:
                print(
                    f"{run_dir} stopped at step {logged_steps(run_dir)} before its first checkpoint; "
                    f"starting it again from step 0",
                    file=sys.stderr,
                )
                clear_run_folder(run_dir)
            return None
        ckpt.checkpoint_folder(run_dir / "checkpoints", "last")  # a corrupt pointer fails here, before any loading
        return saved
    if state != "new":
        if not out.overwrite:
            raise refuse_fresh_start(run_dir, state)
        if main_process:
            clear_run_folder(run_dir)
            drop_runs_row(run_dir.parent / "runs.tsv", run_dir)
    return None


# ---------------------------------------------------------------- signals


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`; the loop checks it after every step,
    saves a checkpoint and raises Interrupted. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
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
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- divergence


class DivergenceGuard:
    """Judges each step's loss: non-finite stops the run; a spike (more than `factor` times the
    median of the last `window` healthy losses of that task) is reported and the checkpoint whose
    weights produced it is not kept. Losses are compared per task (their scales differ)."""

    def __init__(self, factor: float, window: int = 100, warmup: int = 5) -> None:
        self.factor, self.warmup = factor, warmup
        self.window = window
        self.healthy: dict[str, deque] = {}

    def check(self, task: str, loss: float) -> str | None:
        """None when healthy, else a description of what is wrong."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        history = self.healthy.setdefault(task, deque(maxlen=self.window))
        if self.factor and len(history) >= self.warmup:
            median = statistics.median(history)
            if loss > self.factor * median:
                return f"loss spike ({loss:.4g}, more than {self.factor:g}x the running median {median:.4g})"
        history.append(loss)
        return None


def diverged_note(run_dir: Path) -> str | None:
    path = run_dir / "diverged.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    return (
        f"note: this run diverged before ({info.get('reason')} at step {info.get('step')}, task "
        f"{info.get('task')}); it resumes from its last healthy checkpoint, and with the same settings it "
        f"will likely diverge again (lower --lr, raise --warmup, or lower --max_grad_norm in a new run)"
    )
