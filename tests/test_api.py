"""The library face of training: `train.spec_from_argv` parses as the command line does and
`train.fit` runs as it does, with typed errors instead of exit statuses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

import train
from tests.conftest import REPO, run_paths
from train.cli import entry
from train.run.folder import owned
from train.trainer.lifecycle import StopSignals

QUICK = ["--train_limit", "16", "--dev_limit", "8", "--test_limit", "4", "--batch_size", "4", "--wandb", "disabled"]


def argv(tiny_ckpt, tokenizer_dir, out, *flags):
    return ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, out), *QUICK, "--max_steps", "2", *flags]


def test_importing_train_imports_no_torch():
    """`import train` stays light (a SLURM job process imports train.run.state): the API loads on first use."""
    code = "import sys, train, train.run.state, train.run.log, train.run.lock; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout == "False\n"


def test_spec_from_argv_is_the_command_line_parse(tiny_ckpt, tokenizer_dir, tmp_path):
    flags = argv(tiny_ckpt, tokenizer_dir, tmp_path, "--use_lora", "--lora_r", "4")
    spec = train.spec_from_argv(flags)
    assert spec == entry.parse(entry.GENERIC, flags)[0] and spec.config.lora_r == 4
    multitask = train.spec_from_argv(["--tasks", "sst", "quora", *flags[2:]])
    assert multitask.tasks == ("sst", "quora")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_r", "0"], "--lora_r must be >= 1, got 0"),
        (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
        (["--task", "nope"], "invalid choice: 'nope'"),
    ],
)
def test_spec_from_argv_raises_bad_input_instead_of_exiting(tiny_ckpt, tokenizer_dir, tmp_path, capsys, flags, message):
    with pytest.raises(train.BadInput, match=message) as raised:
        train.spec_from_argv([*argv(tiny_ckpt, tokenizer_dir, tmp_path), *flags])
    assert raised.value.exit_status == 2 and capsys.readouterr().err == ""  # nothing printed: the caller decides


@pytest.mark.slow
def test_fit_returns_the_runs_metrics_and_keeps_the_command_lines_rules(tiny_ckpt, tokenizer_dir, tmp_path):
    spec = train.spec_from_argv(argv(tiny_ckpt, tokenizer_dir, tmp_path, "--use_lora"))
    metrics = train.fit(spec)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert metrics == json.loads((run_dir / "metrics.json").read_text()) and metrics["steps"] == 2
    log = (run_dir / "log.jsonl").read_text()
    with pytest.raises(train.BadInput, match="holds a finished run"):  # as the command line refuses it
        train.fit(spec)
    resumed = train.spec_from_argv(argv(tiny_ckpt, tokenizer_dir, tmp_path, "--use_lora", "--resume"))
    assert train.fit(resumed)["best_value"] == metrics["best_value"]  # finished: read back, nothing trained
    assert (run_dir / "log.jsonl").read_text() == log


def test_fit_raises_typed_errors(tiny_ckpt, tokenizer_dir, tmp_path):
    # a folder another process holds: BadInput (exit 2), and nothing of it is touched
    spec = train.spec_from_argv(argv(tiny_ckpt, tokenizer_dir, tmp_path / "busy"))
    folder = entry.run_folder(spec, migrate=False)
    with owned(folder), pytest.raises(train.BadInput, match="being written by process") as raised:
        train.fit(spec)
    assert raised.value.exit_status == 2
    # a stop signal that arrived before training: Interrupted with the shell's status
    stopped = StopSignals()
    stopped.received = signal.SIGTERM
    spec = train.spec_from_argv(argv(tiny_ckpt, tokenizer_dir, tmp_path / "stopped"))
    with pytest.raises(train.Interrupted) as raised:
        train.fit(spec, signals=stopped)
    assert raised.value.exit_status == 143


@pytest.mark.slow
def test_fit_raises_training_diverged(tiny_ckpt, tokenizer_dir, tmp_path):
    spec = train.spec_from_argv(argv(tiny_ckpt, tokenizer_dir, tmp_path, "--lr", "1e3", "--max_steps", "6"))
    with pytest.raises(train.TrainingDiverged, match="blow-up|non-finite") as raised:
        train.fit(spec)
    assert raised.value.exit_status == 3
