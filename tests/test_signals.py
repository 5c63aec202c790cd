"""SIGTERM / SIGINT mid-epoch: training saves a checkpoint at the step it was on and exits 143 / 130;
`--resume` then ends with the same weights as an uninterrupted run. ablate.py forwards the signal to
its jobs, waits for their checkpoints, and a re-run of the grid finishes with the same weights."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, data_limits, plugin_env, run_command, run_paths, write_grid_preset

pytestmark = pytest.mark.slow


def last_weights(run_dir):
    folder = json.loads((run_dir / "checkpoints" / "last.json").read_text())["folder"]
    return load_file(str(run_dir / "checkpoints" / folder / "trainable.safetensors"))


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def wait_for_step(folder, step, proc, timeout=120):
    """The largest step in any log.jsonl under `folder` once it reaches `step` in every run."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        logs = list(folder.glob("*/log.jsonl"))
        steps = []
        for log in logs:
            values = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"train/loss"' in line]
            steps.append(max(values, default=0))
        if steps and min(steps) >= step:
            return steps
        time.sleep(0.02)
    raise AssertionError(f"no run reached step {step} (exit {proc.poll()})")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_saves_and_resume_matches_uninterrupted(tiny_ckpt, tokenizer_dir, tmp_path, signum, status):
    base = [
        sys.executable,
        "-m",
        "train.sentiment",
        "--dataset",
        "sst",
        *run_paths(tiny_ckpt[0], tokenizer_dir),
        *["--train_limit", "48", "--dev_limit", "8", "--test_limit", "4", "--batch_size", "4", "--epochs", "2"],
        # default saving: no --save_every, 30-minute timer; KoRA trains adapters without peft's import (seconds)
        *["--wandb", "disabled", "--use_kora"],
    ]
    env = {"OMP_NUM_THREADS": "1"}
    # the uninterrupted run and the resume run in this process: only the signalled run must be a process
    full = run_command(base + ["--out_dir", str(tmp_path / "full")], env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        base + ["--out_dir", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=plugin_env(OMP_NUM_THREADS="1", GPT2_TEST_STEP_SLEEP="0.2"),
    )
    wait_for_step(out, 5, proc)  # mid-epoch 1 (12 steps per epoch)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr[-2000:]
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    saved = json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"]
    logged = max(json.loads(x)["step"] for x in (run_dir / "log.jsonl").read_text().splitlines())
    assert 5 <= saved < 12 and saved == logged  # nothing to redo: the checkpoint is of the last logged step
    assert f"interrupted by {signal.Signals(signum).name} at step {saved}" in stderr
    assert f"checkpoint at step {saved}. Continue with the same command plus --resume" in stderr
    assert not (run_dir / "metrics.json").exists()
    resumed = run_command(base + ["--out_dir", str(out), "--resume"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run_dir.name} from step {saved}" in resumed.stderr
    full_dir = next(p for p in (tmp_path / "full").iterdir() if p.is_dir())
    assert same(last_weights(full_dir), last_weights(run_dir))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full_dir, run_dir))
    assert (a["dev_acc"], a["best_step"], a["steps"]) == (b["dev_acc"], b["best_step"], b["steps"])
    steps = [json.loads(x)["step"] for x in (run_dir / "log.jsonl").read_text().splitlines() if "train/loss" in x]
    assert steps == list(range(1, 25))  # each step logged once


def test_sigterm_to_ablate_with_two_jobs_checkpoints_both_and_the_rerun_matches(tmp_path, tokenizer_dir):
    preset = write_grid_preset(
        tmp_path / "grid.toml",
        tokenizer_dir,
        "signal-test",
        train_limit=40,
        dev_limit=4,
        test_limit=2,
        batch_size=4,
        epochs=1,
    )

    def command(grid):
        return [
            sys.executable,
            "-m",
            "experiments.ablate",
            str(preset),
            "--out_dir",
            str(grid),
            "--jobs",
            "2",
            "--threads",
            "1",
        ]

    full = run_command(in_process(command(tmp_path / "full")))  # the reference: needs no process
    assert full.returncode == 0, full.stdout + full.stderr
    grid = tmp_path / "stopped"
    proc = subprocess.Popen(
        command(grid),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=plugin_env(GPT2_TEST_STEP_SLEEP="0.3"),
    )
    wait_for_step(grid, 3, proc)  # both jobs mid-epoch (10 steps)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stdout + stderr
    assert "forwarded to 2 running job(s)" in stderr
    assert "0 of 2 runs done, 2 interrupted (checkpointed), 0 not started, 0 failed" in stdout
    runs = sorted(p for p in grid.iterdir() if p.is_dir() and p.name.startswith("sst-"))
    assert len(runs) == 2 and all((r / "checkpoints" / "last.json").is_file() for r in runs)
    assert not (grid / "runs.tsv").exists()
    again = run_command(in_process(command(grid)))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs, 0 already done, 2 to run" in again.stdout
    assert len((grid / "runs.tsv").read_text().splitlines()) == 3
    # each grid has its own random checkpoint folder (same seed, same weights), so the hashes differ
    uninterrupted = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "full").glob("sst-*")}
    for run in runs:
        assert same(last_weights(run), last_weights(uninterrupted[run.name.rsplit("-", 1)[0]]))


def test_a_signal_during_the_last_step_lets_the_run_finish(tiny_ckpt, tokenizer_dir, tmp_path):
    """SIGTERM while the last step runs: the run is complete, so it finishes (metrics.json, runs.tsv,
    exit 0) instead of stopping with a checkpoint that --resume would only have to finish."""
    command = [sys.executable, "-m", "train.sentiment", "--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir)]
    command += [*data_limits(8), "--max_steps", "2", "--wandb", "disabled", "--out_dir", str(tmp_path)]
    env = plugin_env(OMP_NUM_THREADS="1", GPT2_TEST_SIGTERM_AT="2")
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "the run finished before the signal could stop it" in run.stderr
    assert len(list(tmp_path.glob("*/metrics.json"))) == 1 and (tmp_path / "runs.tsv").is_file()


def in_process(command: list[str]) -> list[str]:
    """An ablate command line run one job at a time in the test's process (--launcher inprocess)."""
    words = list(command)
    at = words.index("--jobs")
    del words[at : at + 2]
    return [*words, "--launcher", "inprocess"]
