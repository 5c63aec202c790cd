"""The rough edges a new user hit: each bad input or interruption ends in one line and the right exit
status, before anything loads or is written; help lists what a command accepts; reports and wandb say
what a grid and a run really are."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import ablate, report
from tests.conftest import DATA_DIR, REPO, run_command
from train.cli import entry
from train.run import checkpoint as ckpt


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


def parse_error(argv: list[str], capsys, entry_point=entry.GENERIC) -> str:
    with pytest.raises(SystemExit) as stop:
        entry.parse(entry_point, argv)
    assert stop.value.code == 2
    return one_error_line(capsys)


# ---------------------------------------------------------------- flags and inputs


def test_an_out_dir_that_is_a_file_is_refused_before_anything_loads(tiny_ckpt, tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    line = parse_error(["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(blocker / "grid")], capsys)
    assert f"{blocker} is a file" in line


def test_a_run_folder_given_as_model_points_to_resume_transfer_and_evaluate(tmp_path, capsys):
    run = tmp_path / "sst-lora-r8-a16-lr0.0002-s1-0123abcd"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"run": run.name, "identity": {}, "training": {}}))
    line = parse_error(["--task", "sst", "--model", str(run), "--out_dir", str(tmp_path / "out")], capsys)
    assert "is a run folder" in line and "--resume" in line and "train.transfer" in line
    assert "train.evaluate" in line


def test_triton_kan_kernel_without_a_gpu_is_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite's interpreter would make the CPU acceptable
    argv = ["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path), "--device", "cpu"]
    line = parse_error([*argv, "--use_kan", "--kan_kernel", "triton"], capsys)
    assert "--kan_kernel triton needs a CUDA device (this run: cpu)" in line


def test_last_linear_layer_with_a_variant_is_refused(tiny_ckpt, tmp_path, capsys):
    argv = ["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path)]
    line = parse_error([*argv, "--fine_tune_mode", "last-linear-layer", "--use_lora"], capsys)
    assert "--use_lora would add layers that never train" in line


@pytest.mark.parametrize("kind", ["missing", "empty", "file"])
def test_tokenizer_errors_name_the_folder_and_the_fix(tiny_ckpt, tmp_path, capsys, kind):
    folder = tmp_path / "tok"
    if kind == "empty":
        folder.mkdir()
    elif kind == "file":
        folder.write_text("x")
    argv = ["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path / "o"), "--tokenizer", str(folder)]
    argv += ["--data_dir", str(DATA_DIR)]
    line = parse_error(argv, capsys)
    expected = {"missing": "does not exist", "empty": "holds no GPT-2 tokenizer", "file": "is a file"}[kind]
    assert str(folder) in line and expected in line and "--tokenizer" in line
    assert "Repo id" not in line and "repo_type" not in line  # no hub-client internals


def test_help_lists_exactly_the_flags_a_command_accepts_each_default_once():
    def usage(module: str) -> str:
        done = run_command(["-m", module, "--help"], env={"COLUMNS": "80"}, cwd=Path("/"))
        assert done.returncode == 0, done.stderr
        return done.stdout

    sentiment_help = usage("train.sentiment")
    assert "--temperature" not in sentiment_help and "--paraphrase_head" not in sentiment_help
    assert "--lr" in sentiment_help and "--use_lora" in sentiment_help
    sonnet_help = usage("train.sonnet")
    assert "--temperature" in sonnet_help and "--paraphrase_head" not in sonnet_help
    for text in (sentiment_help, sonnet_help):
        for line in text.split("\n  --")[1:]:
            assert line.count("(default:") <= 1, line


# ---------------------------------------------------------------- interruptions and pipes


@pytest.mark.slow
def test_a_second_ctrl_c_exits_130_with_one_line(tiny_ckpt, tokenizer_dir, tmp_path):
    argv = [
        sys.executable, "-m", "train", "--task", "sst", "--model", str(tiny_ckpt[0]), "--tokenizer",
        str(tokenizer_dir), "--data_dir", str(DATA_DIR), "--out_dir", str(tmp_path), "--wandb", "disabled",
        "--train_limit", "4000", "--dev_limit", "8", "--test_limit", "2", "--batch_size", "2", "--epochs", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob("*/log.jsonl")):
        time.sleep(0.05)  # training has started
    proc.send_signal(signal.SIGINT)
    time.sleep(0.03)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "stopped at once by a second Ctrl-C" in err
    # the second Ctrl-C may land inside the first one's checkpoint write: the pointer still names a
    # complete checkpoint, and a resume later leaves one folder
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    last = ckpt.checkpoint_folder(run / "checkpoints", "last")
    assert last is None or ckpt.load_checkpoint(last)[1]["step"] >= 1


def test_output_piped_into_head_ends_without_a_traceback():
    code = "from train.cli.exits import exit_status; import sys; sys.exit(exit_status(lambda: print('x' * 4_000_000)))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # what `| head -c 10` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err and "BrokenPipeError" not in err


def test_every_command_ends_through_exit_status():
    modules = [*REPO.glob("train/*.py"), *REPO.glob("experiments/*.py"), *REPO.glob("scripts/*.py")]
    commands = [p for p in modules if 'if __name__ == "__main__":' in p.read_text()]
    assert len(commands) > 20
    assert [p.name for p in commands if "sys.exit(exit_status(main))" not in p.read_text()] == []


def test_sonnet_generation_shows_progress_on_a_terminal(tiny_ckpt, tokenizer_dir, monkeypatch, capsys):
    from model import GPT2LMHeadModel, load_tokenizer
    from train.base.settings import TrainingSettings
    from train.tasks.sonnet import Sonnet, SonnetSettings

    model = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0]).eval()
    task = Sonnet(
        load_tokenizer(tokenizer_dir),
        DATA_DIR,
        TrainingSettings(dev_limit=4, test_limit=2, eval_batch_size=2),
        model.config.n_positions,
        SonnetSettings(max_new_tokens=4, greedy=True),
    )
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr("train.base.console.BAR_DELAY", 0.0)  # (a bar appears after 2 s of work; this is quick)
    metrics = task.evaluate(model, None, None, "cpu")
    assert task.test_predictions(model, None, None, "cpu") == {}  # no folder given: nothing written
    err = capsys.readouterr().err
    assert "generating 4 dev sonnets" in err and "generating 2 test sonnets" in err
    assert metrics["generation_seconds"] > 0


# ---------------------------------------------------------------- grids


def test_every_ablate_input_error_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "grid"
    cases = {
        "missing preset": [str(tmp_path / "smoek.toml")],
        "bad toml": [str(_write(tmp_path / "bad.toml", "name = "))],
        "missing key": [str(_write(tmp_path / "nokey.toml", 'name = "x"\ntasks = ["sst"]\n'))],
        "bad flags": [str(_write(tmp_path / "flags.toml", _preset('broken = ["--lora_r", "4"]')))],
        "bad jobs": [str(tmp_path / "flags.toml"), "--jobs", "0"],
    }
    for name, argv in cases.items():
        with pytest.raises(SystemExit) as stop:
            ablate.main([*argv, "--out_dir", str(out)])
        assert stop.value.code == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err, (name, err)
        assert not out.exists(), name
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ablate.main([str(tmp_path / "smoek.toml")])
    assert "presets in experiments/presets" in capsys.readouterr().err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _preset(variant: str) -> str:
    return f'name = "g"\ntasks = ["sst"]\nseeds = [1]\n[model]\nrandom_init = "tiny"\n[variants]\n{variant}\n'


def half_finished_report(tmp_path, cells, done):
    """(report.md, its main table) of a grid whose grid.json plans `cells` x seeds 1, 2, and whose
    runs.tsv holds the `done` runs."""
    from train.run.index import RUNS_COLUMNS

    grid = tmp_path / "grid"
    grid.mkdir()
    plan = {"name": "g", "preset": "p.toml", "model": {"model": "gpt2"}, "seeds": [1, 2], "cells": cells}
    (grid / "grid.json").write_text(json.dumps(plan))
    rows = []
    for variant, task, seed in done:
        values = {c: "" for c in RUNS_COLUMNS}
        values.update(
            run=f"{task}-{variant}-s{seed}",
            task=task,
            variant=variant,
            config_hash=f"{variant}{task}",
            seed=seed,
            metric="dev_acc" if task == "sst" else "dev_chrf",
            best_value=0.3 + 0.01 * seed,
            trainable_params=10,
            train_seconds=60.0 if task == "sonnet" else 2.0,
            steps=20,
            generation_seconds=50.0 if task == "sonnet" else "",
            peak_memory_mb=100,
            run_dir=str(grid / f"{task}-{variant}-s{seed}"),
        )
        rows.append("\t".join(str(values[c]) for c in RUNS_COLUMNS))
    (grid / "runs.tsv").write_text("\t".join(RUNS_COLUMNS) + "\n" + "\n".join(rows) + "\n")
    assert report.main([str(grid)]) == 0
    text = (grid / "report" / "report.md").read_text()
    return text, text.split("Cost per task")[0]


def test_report_on_a_half_finished_grid_counts_runs_and_marks_incomplete_cells(tmp_path, capsys):
    cells = [["base", "sst"], ["lora", "sst"], ["base", "sonnet"], ["lora", "sonnet"]]
    done = [("base", "sst", 1), ("base", "sst", 2), ("lora", "sst", 1), ("base", "sonnet", 1)]
    text, table = half_finished_report(tmp_path, cells, done)
    assert "4 of 8 planned runs have finished" in text and "3 cell(s) miss seeds" in text
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora"))
    base_row = next(line for line in table.splitlines() if line.startswith("| base"))
    assert lora_row.count("†") == 2 and base_row.count("†") == 1  # lora: sst (1 of 2) and sonnet (none)
    costs = text.split("Cost per task")[1]
    assert "sst s/step" in costs and "sonnet generation s" in costs and "train time" not in text
    base_costs = next(line for line in costs.splitlines() if line.startswith("| base"))
    assert "| 0.1000 |" in base_costs and "| 3.0000 |" in base_costs and "| 50.0 |" in base_costs


# ---------------------------------------------------------------- wandb


@pytest.mark.slow
def test_wandb_files_carry_the_grouping_an_interrupted_run_is_marked_and_resume_replays(
    tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = [
        sys.executable, "-m", "train", "--task", "sst", "--model", str(tiny_ckpt[0]), "--tokenizer",
        str(tokenizer_dir), "--data_dir", str(DATA_DIR), "--out_dir", str(tmp_path), "--wandb", "offline",
        "--wandb_group", "gridx", "--label", "vera8", "--peft_method", "vera", "--train_limit", "120",
        "--dev_limit", "4", "--test_limit", "2", "--batch_size", "2", "--epochs", "1", "--save_every", "1",
        "--stage", "final", "--lr_chosen_by", "tune-run-a", "tune-run-b",  # what a [tune] grid's final run carries
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list(tmp_path.glob("*/log.jsonl"))
        if logs and logs[0].read_text().count("train/loss") >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run_dir = logs[0].parent
    record = json.loads((run_dir / "config.json").read_text())
    (first,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    data = first.read_bytes()
    for text in (record["config_hash"], "vera8", "gridx-sst", "peft-vera", "interrupted", "tune-run-b"):
        assert text.encode() in data, text
    assert b"lr_chosen_by" in data and record["training"]["stage"] == "final"
    resumed = run_command([*argv, "--resume"])  # only the interrupted run must be a process (its SIGINT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (resumed,) = set(run_dir.glob("wandb/offline-run-*/*.wandb")) - {first}
    # The resumed wandb run holds the history of every step: the earlier ones replayed from log.jsonl.
    assert resumed.read_bytes().count(b"train/loss") >= 60


def test_the_readme_and_the_cli_agree_that_lora_kan_with_dora_is_kolmg_dora(tiny_ckpt, tmp_path):
    readme = (REPO / "docs" / "variants.md").read_text()
    assert "`use_kan` + `use_lora` + `lora_dora` | **KOLMG-DoRA**" in readme
    assert "LoRA-KAN + `--lora_dora`) are refused" not in readme and "(LoRA-KAN + `--lora_dora`)" not in readme
    argv = ["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path)]
    spec, _ = entry.parse(entry.GENERIC, [*argv, "--use_kan", "--use_lora", "--lora_dora"], inputs=False)
    assert spec.config.lora_dora and spec.config.use_kan and "kandora" in spec.run_name()


def test_a_planned_column_or_row_with_no_finished_run_is_shown_not_dropped(tmp_path):
    """Every † the count line announces is in the table: sonnet (no run finished) keeps its column and
    graph (no run finished) its row."""
    cells = [["base", "sst"], ["lora", "sst"], ["graph", "sst"], ["base", "sonnet"], ["lora", "sonnet"]]
    done = [("base", "sst", 1), ("base", "sst", 2), ("lora", "sst", 1), ("lora", "sst", 2)]
    text, table = half_finished_report(tmp_path, cells, done)
    assert "4 of 10 planned runs have finished" in text and "3 cell(s) miss seeds" in text
    assert "sonnet (dev_chrf)" in table and "| graph | – † |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert sum(row.count("†") for row in rows) == 3
