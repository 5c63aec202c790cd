"""Fault trials: kill or starve real training runs and count what the record lost.

    python scripts/fault_trials.py --model ckpt/tiny --trials 10 [--seed 0] [--code DIR]

Each fault is tried `--trials` times on a small SST run (`--save_every 1`, so most moments fall in or
near a checkpoint write), then the run is continued the way a user would (the same command, plus
`--resume` once its folder exists) until it exits 0, and compared with an uninterrupted run:
* `sigkill`     SIGKILL at a seeded random moment of the run;
* `row`         SIGKILL between metrics.json and the runs.tsv row (the index's lock is held meanwhile);
* `disk-full`   the run folder on a tmpfs too small for a second checkpoint (root only; skipped
                otherwise); the tmpfs is then enlarged ("free space") before continuing;
* `pointer`     SIGKILL once the run has a checkpoint, then `checkpoints/last.json` deleted (a pointer
                lost: the checkpoint folders themselves are intact).
Per fault it prints: trials, rows lost (a finished run without its row), duplicate rows, checkpoints
lost (a resume that started again from step 0 although a complete checkpoint was there), commands that
ended in a traceback, and bit-exact resumes (the final metrics and trained weights equal the
uninterrupted run's). `--code DIR` runs another checkout (e.g. a worktree of an older commit) with this
interpreter, to measure before and after on the same machine.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from train.cli.exits import exit_status

REPO = Path(__file__).resolve().parents[1]


def command(code: Path, model: Path, out: Path, steps: int) -> list[str]:
    shared = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
    return [
        sys.executable, "-m", "train.sentiment", "--dataset", "sst", "--model", str(model),
        "--tokenizer", str(shared / "tokenizer" / "gpt2"), "--data_dir", str(shared / "data" / "cs224n"),
        "--out_dir", str(out), "--train_limit", str(4 * steps), "--dev_limit", "8", "--test_limit", "2",
        "--batch_size", "4", "--epochs", "1", "--eval_every", str(max(1, steps // 2)), "--save_every", "1",
        "--wandb", "disabled", "--seed", "3",
    ]  # fmt: skip


def run(argv: list[str], code: Path, log: list[str]) -> int:
    done = subprocess.run(argv, cwd=code, capture_output=True, text=True)
    log.append(done.stderr)
    return done.returncode


def finish(argv: list[str], out: Path, code: Path, log: list[str]) -> int:
    """Continue as a user would: --resume once the folder exists; a few tries at most."""
    status = 1
    for _ in range(3):
        started = any(p.is_dir() for p in out.iterdir()) if out.exists() else False
        status = run([*argv, "--resume"] if started else argv, code, log)
        if status == 0:
            break
    return status


def outcome(out: Path, reference: dict, log: list[str]) -> dict:
    runs = [p for p in out.iterdir() if p.is_dir() and (p / "config.json").exists()]
    rows = []
    if (out / "runs.tsv").exists():
        with open(out / "runs.tsv", newline="", errors="replace") as handle:
            rows = [r for r in csv.DictReader(handle, delimiter="\t") if r.get("run_dir")]
    finished = [p for p in runs if (p / "metrics.json").exists()]
    exact = False
    if len(finished) == 1:
        exact = fingerprint(finished[0]) == reference
    return {
        "checkpoints": sum("starting it again from step 0" in text for text in log),
        "lost": sum(1 for p in finished if not any(r["run_dir"] == str(p) for r in rows)),
        "duplicates": max(0, len(rows) - len({(r.get("task"), r.get("config_hash"), r.get("seed")) for r in rows})),
        "tracebacks": sum("Traceback" in text for text in log),
        "exact": exact,
    }


def fingerprint(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pointer = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    weights = load_file(str(run_dir / "checkpoints" / pointer["folder"] / "trainable.safetensors"))
    return {
        "best_value": metrics.get("best_value"),
        "best_step": metrics.get("best_step"),
        "weights": {k: v.float().sum().item() for k, v in sorted(weights.items())},
    }


def timed(argv: list[str], code: Path, out: Path) -> tuple[int, float, str]:
    """(exit status, seconds from the run folder's creation to the exit, stderr): the window a kill can hit."""
    process = subprocess.Popen(argv, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not list(out.glob("*/config.json")) and process.poll() is None:
        time.sleep(0.01)
    started = time.monotonic()
    err = process.communicate()[1]
    return process.returncode, time.monotonic() - started, err


def kill_at(argv: list[str], code: Path, out: Path, delay: float, log: list[str]) -> bool:
    """SIGKILL `delay` s after the run folder appears; whether the run was still going (the kill landed)."""
    process = subprocess.Popen(argv, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("*/config.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the clock starts once the run folder exists (imports take seconds)
    time.sleep(delay)
    landed = process.poll() is None
    process.kill()
    log.append(process.communicate()[1])
    return landed


def kill_after_checkpoint(argv: list[str], code: Path, out: Path, log: list[str]) -> bool:
    """SIGKILL once a complete checkpoint exists, then delete the last-checkpoint pointer; whether a
    checkpoint was there to lose."""
    process = subprocess.Popen(argv, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("*/checkpoints/last.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    log.append(process.communicate()[1])
    pointers = list(out.glob("*/checkpoints/last.json"))
    for pointer in pointers:
        pointer.unlink()
    return bool(pointers) and not list(out.glob("*/metrics.json"))


def kill_before_row(argv: list[str], code: Path, out: Path, log: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.tsv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = subprocess.Popen(argv, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not list(out.glob("*/metrics.json")) and process.poll() is None:
            time.sleep(0.01)
        process.kill()
        log.append(process.communicate()[1])


def mount_tmpfs(folder: Path, megabytes: int, remount: bool = False) -> bool:
    options = f"{'remount,' if remount else ''}size={megabytes}m"
    args = ["mount", "-o", options, str(folder)] if remount else ["mount", "-t", "tmpfs", "-o", options, "tmpfs"]
    return subprocess.run([*args, *([] if remount else [str(folder)])], capture_output=True).returncode == 0


def checkpoint_megabytes(run_dir: Path) -> float:
    folder = run_dir / "checkpoints"
    sizes = [sum(f.stat().st_size for f in p.iterdir()) for p in folder.iterdir() if p.is_dir()]
    return max(sizes) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder to fine-tune")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", nargs="+", default=["sigkill", "row", "disk-full", "pointer"])
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout to run (default: this one)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="fault_trials_"))
    try:
        base = command(args.code, args.model.resolve(), work / "reference", args.steps)
        status, seconds, err = timed(base, args.code, work / "reference")
        if status != 0:
            print(err, file=sys.stderr)
            return 1
        (reference_run,) = [p for p in (work / "reference").iterdir() if p.is_dir()]
        reference = fingerprint(reference_run)
        size = checkpoint_megabytes(reference_run)
        print(f"reference run: {seconds:.1f} s from its folder's creation to its exit, checkpoint {size:.1f} MB")
        print(f"code: {args.code}")
        print(
            "| fault | trials (hit a live run) | rows lost | duplicate rows | checkpoints lost | tracebacks "
            "| bit-exact resumes |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for fault in args.faults:
            totals = {"lost": 0, "duplicates": 0, "checkpoints": 0, "tracebacks": 0, "exact": 0, "landed": 0}
            trials = 0
            for trial in range(args.trials):
                out = work / f"{fault}-{trial}"
                out.mkdir()
                argv_trial, log = command(args.code, args.model.resolve(), out, args.steps), []
                if fault == "sigkill":
                    totals["landed"] += kill_at(argv_trial, args.code, out, rng.uniform(0, seconds), log)
                elif fault == "row":
                    kill_before_row(argv_trial, args.code, out, log)
                elif fault == "pointer":
                    totals["landed"] += kill_after_checkpoint(argv_trial, args.code, out, log)
                elif fault == "disk-full":
                    if not mount_tmpfs(out, int(size * 1.6) + 2):  # room for one checkpoint, not two
                        print(f"| {fault} | skipped: mounting a tmpfs needs root | | | | | |")
                        break
                    run(argv_trial, args.code, log)
                    mount_tmpfs(out, int(size * 20) + 64, remount=True)  # "free space"
                status = finish(argv_trial, out, args.code, log)
                failed = {"lost": 0, "duplicates": 0, "exact": False}
                result = outcome(out, reference, log) if status == 0 else failed
                result.setdefault("tracebacks", sum("Traceback" in text for text in log))
                result.setdefault("checkpoints", sum("starting it again from step 0" in text for text in log))
                for key in ("lost", "duplicates", "checkpoints", "tracebacks", "exact"):
                    totals[key] += int(result[key])
                if fault not in ("sigkill", "pointer"):
                    totals["landed"] += 1
                trials += 1
                if fault == "disk-full":
                    subprocess.run(["umount", str(out)], capture_output=True)
            else:
                print(
                    f"| {fault} | {trials} ({totals['landed']}) | {totals['lost']} | {totals['duplicates']} | "
                    f"{totals['checkpoints']} | {totals['tracebacks']} | {totals['exact']} of {trials} |",
                    flush=True,
                )
    finally:
        for mount in work.glob("disk-full-*"):
            subprocess.run(["umount", str(mount)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
