"""Running a grid's jobs on this machine: `Jobs` starts each run as its own process (`--launcher local`,
`--jobs N` at a time, signals forwarded); `InProcessJobs` calls each run's command in this process
(`--launcher inprocess`, one at a time). `run_jobs` runs a stage's jobs and sorts the outcome. The
grid cannot tell which ran a job. (SLURM: experiments/launchers.py.)
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

from experiments.planning import REPO, PlannedRun, run_lr, status
from train.base import console
from train.trainer.lifecycle import EXIT_DIVERGED, EXIT_STATUS, StopSignals


class Jobs:
    """The running training processes, so a signal can be forwarded to each of them."""

    def __init__(self, gpus: list[int] | None = None) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.names: dict[subprocess.Popen, str] = {}  # each running job's run name (progress lines)
        self.stop_signal: int | None = None
        # --gpus: a pool of free GPUs; a job takes one (as its only visible device) and gives it back
        self.free_gpus: queue.Queue[int] | None = None
        if gpus:
            self.free_gpus = queue.Queue()
            for gpu in gpus:
                self.free_gpus.put(gpu)

    def describe(self) -> str:
        """What runs now, for the grid's progress lines."""
        with self.lock:
            names = sorted(self.names.values())
        return f"running {', '.join(names)}" if names else ""

    def forward(self, signum: int, frame) -> None:
        first = self.stop_signal is None
        self.stop_signal = signum
        with self.lock:
            for proc in self.running:
                proc.send_signal(signum)
        if first:
            print(
                f"\nreceived {signal.Signals(signum).name}: forwarded to {len(self.running)} running job(s); waiting "
                f"for their checkpoints (no new runs start)",
                file=sys.stderr,
                flush=True,
            )

    def execute(self, run: PlannedRun, threads: int, log_dir: Path) -> tuple[PlannedRun, int | None, float]:
        """(run, exit status or None when it was never started, seconds). Jobs run in their own process
        sessions: a SIGKILL of ablate leaves them running, and a re-run sees their folders held."""
        argv = list(run.argv)
        if status(run) == "resume":
            argv.append("--resume")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        gpu = self.free_gpus.get() if self.free_gpus is not None else None
        try:
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)  # the job sees only its GPU, as cuda:0
                argv += ["--device", "cuda"]
            return self._run(run, argv, env, log_dir)
        finally:
            if gpu is not None:
                self.free_gpus.put(gpu)

    def _run(self, run: PlannedRun, argv: list[str], env: dict, log_dir: Path) -> tuple[PlannedRun, int | None, float]:
        start = time.perf_counter()
        with self.lock:
            if self.stop_signal is not None or status(run) in ("done", "running"):
                return run, None, 0.0  # stopped, or finished / taken by another process since it was planned
            # appended, never truncated: an earlier attempt's log (the one an interruption message pointed
            # to) and another grid's job on the same folder keep their lines
            with open(log_dir / f"{run.name}.log", "a") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} ablate (pid {os.getpid()}): {run.name}\n")
                log.flush()
                # its own session: a Ctrl-C in the terminal reaches it once, forwarded from here
                proc = subprocess.Popen(
                    [sys.executable, "-m", run.module, *argv],
                    cwd=REPO,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                )
            self.running.add(proc)
            self.names[proc] = run.name
        code = proc.wait()
        with self.lock:
            self.running.discard(proc)
            self.names.pop(proc, None)
        return run, code, time.perf_counter() - start


class InProcessJobs(Jobs):
    """`--launcher inprocess`: each job is its command's `main(argv)` called in this process, one at a
    time in the main thread, its output appended to the same log a process would write. Signals reach
    the run itself (its StopSignals are the handlers while it runs): it saves its checkpoint and
    returns 130 / 143, and no further job starts. The grid, its report and its stages cannot tell
    which launcher ran a job."""

    parallel = False

    def _run(self, run: PlannedRun, argv: list[str], env: dict, log_dir: Path) -> tuple[PlannedRun, int | None, float]:
        start = time.perf_counter()
        if self.stop_signal is not None or status(run) in ("done", "running"):
            return run, None, 0.0
        StopSignals.last_received = None
        self.names = {run.name: run.name}  # (what the grid's progress lines name)
        with open(log_dir / f"{run.name}.log", "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} ablate (in process {os.getpid()}): {run.name}\n")
            log.flush()
            with contextlib.chdir(REPO), torch_threads(env):  # where a local job runs (cwd=REPO)
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    code = call_main(run.module, argv)
        self.names = {}
        release_memory()
        # A signal the run caught (its StopSignals were the handlers while it ran) stops the grid too,
        # also when the run finished anyway (it arrived during its last step or evaluation)
        received = StopSignals.last_received
        if received is None and code in EXIT_STATUS.values():
            received = next(s for s, c in EXIT_STATUS.items() if c == code)
        if received is not None:
            self.stop_signal = self.stop_signal or received
        return run, code, time.perf_counter() - start


def call_main(module: str, argv: list[str]) -> int:
    """`python -m module argv`'s exit status, called in this process. An uncaught error is what a
    process would make of it: its traceback (in the job's log) and exit status 1, so the grid goes on
    with its other runs, as it does under --launcher local."""
    name = "train.cli.entry" if module == "train" else module
    try:
        return int(importlib.import_module(name).main(argv) or 0)
    except SystemExit as stop:  # a parser's error (2), --help (0)
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - a crash of one run, reported in its log
        traceback.print_exc()
        return 1


def release_memory() -> None:
    """What a finished process would give back: garbage, cached GPU memory, compiled graphs (whose
    cache limits --compile raises)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


@contextlib.contextmanager
def torch_threads(env: dict):
    """The job's thread count (what OMP_NUM_THREADS gives a process), restored afterwards."""

    previous = torch.get_num_threads()
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_jobs(jobs: Jobs, todo: list[PlannedRun], parallel: int, threads: int, log_dir: Path) -> dict[str, list]:
    """Run `todo` with `parallel` at a time; lists of the failed, interrupted and never started."""
    outcome: dict[str, list] = {"failed": [], "interrupted": [], "not_started": [], "elsewhere": []}
    work = console.phase("grid", total=len(todo), unit="runs", status=jobs.describe)
    with work, ThreadPoolExecutor(max_workers=parallel) as pool:
        if getattr(jobs, "parallel", True):  # counted as they finish
            futures = [pool.submit(jobs.execute, r, threads, log_dir) for r in todo]
            results = (future.result() for future in as_completed(futures))
        else:  # in this process's main thread, one at a time (signals, output, torch's thread count)
            results = (jobs.execute(r, threads, log_dir) for r in todo)
        for done, (run, code, seconds) in enumerate(results, 1):
            work.set(done)
            if code is None:
                outcome["not_started"].append(run)
                continue
            log_file = log_dir / (run.name + ".log")
            if code != 0 and status(run) == "done":  # e.g. killed after its metrics.json: finished all the same
                code = 0
            if code != 0 and status(run) == "running":  # another grid (or job) took the folder first: its run
                outcome["elsewhere"].append(run)
                console.say(
                    f"[{done}/{len(todo)}] {run.task:7s} {run.variant:12s}: held by another process (another grid on "
                    f"this out_dir?): left to it, not re-run ({run.run_dir.name})",
                    sys.stdout,
                )
                continue
            if code == EXIT_DIVERGED and run.stage == "tune":  # a trial's result: the rate is too high
                code, mark = 0, f"diverged (a candidate rate that scores below every other; see {log_file})"
            elif code in EXIT_STATUS.values():
                outcome["interrupted"].append(run)
                mark = f"interrupted (exit {code}; checkpointed, see {log_file})"
            else:
                mark = "ok" if code == 0 else f"FAILED (exit {code}, see {log_file})"
            what = f"lr {run_lr(run)}" if run.stage == "tune" else f"seed {run.seed}"
            console.say(
                f"[{done}/{len(todo)}] {run.task:7s} {run.variant:12s} {what}: {mark} ({seconds:.1f} s)", sys.stdout
            )
            if code not in (0, *EXIT_STATUS.values()):
                outcome["failed"].append(run)
    return outcome
