"""What the slurm launcher costs, measured with submitit's local executor (the slurm code path without
sbatch): submission overhead per run, and the cost of a preemption (SIGTERM -> checkpoint -> requeue
-> --resume) against the same run uninterrupted.

    python scripts/bench_launch.py [--runs 8] [--steps 64] [--preempt_at 16]

A tiny random GPT-2 on SST (a pipeline measurement, not a GPT-2 figure). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from experiments import launchers, planning
from train.cli.exits import exit_status
from train.run.state import folder_state

REPO = Path(__file__).resolve().parents[1]


def write_preset(folder: Path, runs: int, steps: int) -> Path:
    path = folder / "bench.toml"
    path.write_text(
        f'name = "bench-launch"\ntasks = ["sst"]\nseeds = {list(range(1, runs + 1))}\n[model]\nrandom_init = "tiny"\n'
        f"[common]\ntrain_limit = {4 * steps}\ndev_limit = 8\ntest_limit = 2\nbatch_size = 4\nepochs = 1\n"
        f'wandb = "disabled"\n[variants]\nbase = []\n'
    )
    return path


def steps_logged(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    return sum('"train/loss"' in line for line in log.read_text().splitlines()) if log.is_file() else 0


def wait(condition, poll: float = 0.05) -> float:
    start = time.perf_counter()
    while not condition():
        time.sleep(poll)
    return time.perf_counter() - start


def run_one(preset: planning.GridPreset, grid: Path, seed: int, preempt_at: int | None) -> float:
    """Seconds from submission to the run's metrics.json (SIGTERM to its job after `preempt_at` steps)."""
    one = dataclasses.replace(preset, seeds=[seed])
    (run,) = planning.plan(one, grid, [])
    settings = launchers.SlurmSettings(gpus_per_run=0, time_min=60)
    start = time.perf_counter()
    [(_, job)], _ = launchers.submit("submitit_local", [run], grid, settings, "bench", threads=1)
    if preempt_at is not None:
        wait(lambda: steps_logged(run.run_dir) >= preempt_at)
        os.kill(int(job.job_id), signal.SIGTERM)
    wait(lambda: folder_state(run.run_dir) == "finished")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8, help="runs submitted as one array (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--preempt_at", type=int, default=16, help="SIGTERM after this step (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="preemption pairs measured (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as scratch:
        folder = Path(scratch)
        preset = planning.load_preset(write_preset(folder, args.runs, args.steps))
        grid = folder / "array"
        grid.mkdir()
        runs = planning.plan(preset, grid, [])
        settings = launchers.SlurmSettings(gpus_per_run=0, time_min=60)
        start = time.perf_counter()
        submitted, _ = launchers.submit("submitit_local", runs, grid, settings, "bench", threads=1)
        submit_seconds = time.perf_counter() - start
        for _, job in submitted:
            job.result()
        print(
            f"submission: {args.runs} runs as one array in {submit_seconds:.3f} s = "
            f"{submit_seconds / args.runs * 1000:.1f} ms per run (local executor: pickling the job and starting "
            f"its controller process; sbatch adds its own round trip)"
        )
        plain, preempted = [], []
        for repeat in range(args.repeats):
            plain.append(run_one(preset, folder / f"plain{repeat}", 1, None))
            preempted.append(run_one(preset, folder / f"preempted{repeat}", 1, args.preempt_at))
        extra = [p - u for p, u in zip(preempted, plain, strict=True)]
        print(
            f"one run of {args.steps} steps, submitted to finished (median of {args.repeats}): uninterrupted "
            f"{statistics.median(plain):.2f} s, with a SIGTERM after step {args.preempt_at} (checkpoint, requeue, "
            f"--resume) {statistics.median(preempted):.2f} s: the preemption costs {statistics.median(extra):.2f} s "
            f"(ratio {statistics.median(preempted) / statistics.median(plain):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
