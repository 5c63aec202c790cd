"""Progress off a terminal (train/base/console.py): a line at least every interval while work runs, none for
work shorter than that, none from a rank that shows no progress; and a real training command whose
output goes to a pipe never stays silent longer than the bound."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, plugin_env, run_paths
from train.base import console


def test_a_long_phase_prints_its_state_every_interval(monkeypatch, capsys):
    monkeypatch.setenv(console.INTERVAL_ENV, "0.2")
    with console.phase("predicting", total=4, unit="batches", status=lambda: "2 running") as work:
        work.advance()
        time.sleep(1.0)
    time.sleep(0.3)  # the heartbeat thread sees no phase and stops
    lines = capsys.readouterr().err.splitlines()
    assert 3 <= len(lines) <= 6, lines
    assert all(line.startswith("predicting: 1/4 batches, 2 running (") and line.endswith(" s)") for line in lines)


def test_short_or_disabled_phases_print_nothing(monkeypatch, capsys):
    monkeypatch.setenv(console.INTERVAL_ENV, "0.5")
    console.say("a line")  # the silence clock starts here
    with console.phase("quick"):
        time.sleep(0.1)
    with console.phase("another rank's share", enabled=False):
        time.sleep(0.8)
    assert capsys.readouterr().err == "a line\n"


def test_say_resets_the_silence_clock_and_doing_names_the_activity(monkeypatch, capsys):
    monkeypatch.setenv(console.INTERVAL_ENV, "0.4")
    with console.phase("starting"):
        console.doing("loading the model")
        for _ in range(4):
            time.sleep(0.2)
            console.say("a line of the run's own")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-3:] == ["a line of the run's own"] * 3  # never silent for 0.4 s after them: no heartbeat
    with console.phase("starting"):
        console.doing("loading the model")
        time.sleep(0.7)
    assert capsys.readouterr().err.startswith("starting: loading the model (")


def stamped(command: list[str], env: dict) -> tuple[list[tuple[float, str]], float, int]:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    lines = [(time.perf_counter() - start, raw.decode().rstrip("\n")) for raw in process.stdout]
    return lines, time.perf_counter() - start, process.wait()


@pytest.mark.slow
def test_a_slow_run_logged_to_a_file_is_never_silent_longer_than_the_bound(tiny_ckpt, tokenizer_dir, tmp_path):
    """Each step slowed to 2.5 s (the test hook) with a 1 s interval: without the heartbeat the step
    lines alone would leave 2.5 s gaps and more."""
    env = {**plugin_env(), console.INTERVAL_ENV: "1", "GPT2_TEST_STEP_SLEEP": "2.5"}
    flags = ["--train_limit", "16", "--dev_limit", "8", "--test_limit", "8", "--batch_size", "4", "--wandb", "disabled"]
    command = [
        sys.executable,
        "-m",
        "train.sentiment",
        "--dataset",
        "sst",
        *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path),
    ]
    lines, wall, code = stamped([*command, *flags, "--max_steps", "2", "--log_every", "100"], env)
    assert code == 0, lines
    # from the command's first line (before it, the interpreter starts and imports: no code of ours runs)
    assert lines[0][0] < 10, lines[:2]
    marks = [*(t for t, _ in lines), wall]
    gaps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    around = [line for _, line in lines[worst : worst + 2]]
    assert gaps[worst] < 2.2, (gaps[worst], around)
    assert any(line.startswith("training: ") for _, line in lines)  # heartbeats carried the slow steps
