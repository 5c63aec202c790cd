"""Ablation grid runner and report: a two-run grid completes, a killed grid finishes only the
missing run, the report's numbers equal the run folders', noise is not marked, a planted gap is."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from tests.conftest import DATA_DIR, REPO, kill_and_wait, run_command, start_grid, write_grid_preset

PRESETS = REPO / "experiments" / "presets"


def inprocess_inputs(tokenizer_dir) -> list[str]:
    """The data and tokenizer flags of a test grid, its jobs run one at a time in the test's process."""
    return ["--data_dir", str(DATA_DIR), "--tokenizer", str(tokenizer_dir), "--threads", "1", "--launcher", "inprocess"]


def tiny_grid(tmp_path, tokenizer_dir):
    """Two seeds of the base model on sst, two steps each."""
    limits = {"train_limit": 16, "dev_limit": 8, "test_limit": 4, "batch_size": 4, "max_steps": 2}
    return write_grid_preset(tmp_path / "grid.toml", tokenizer_dir, "tiny-test", **limits)


@pytest.mark.slow
def test_grid_resumes_after_kill_and_report_matches(tmp_path, tokenizer_dir):
    preset = tiny_grid(tmp_path, tokenizer_dir)
    grid = tmp_path / "grid"
    cmd = [sys.executable, "-m", "experiments.ablate", str(preset), "--out_dir", str(grid), "--threads", "1"]
    proc = start_grid(cmd, GPT2_TEST_STEP_SLEEP="0.5")
    deadline = time.time() + 180
    while time.time() < deadline:
        runs_tsv = grid / "runs.tsv"
        if runs_tsv.is_file() and len(runs_tsv.read_text().splitlines()) >= 2:  # first run finished
            assert kill_and_wait(proc, group=True) == -signal.SIGKILL
            break
        time.sleep(0.05)
    assert proc.returncode == -signal.SIGKILL
    assert len((grid / "runs.tsv").read_text().splitlines()) == 2
    again = run_command([*cmd, "--launcher", "inprocess"])  # (the kill needed a process; the re-run does not)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 runs, 1 already done, 1 to run" in again.stdout
    rows = (grid / "runs.tsv").read_text().splitlines()
    assert len(rows) == 3 and len({r.split("\t")[0] for r in rows[1:]}) == 2
    # rows lost (a run killed between its metrics.json and its row): a re-run of ablate adds them back
    (grid / "runs.tsv").write_text(rows[0] + "\n" + rows[1] + "\n")
    from experiments import ablate

    assert ablate.main([str(preset), "--out_dir", str(grid), "--threads", "1", "--launcher", "inprocess"]) == 0
    assert sorted((grid / "runs.tsv").read_text().splitlines()[1:]) == sorted(rows[1:])

    report = run_command([sys.executable, "-m", "experiments.report", str(grid)])
    assert report.returncode == 0, report.stderr
    values = [
        json.loads((p / "metrics.json").read_text())["dev_acc"]
        for p in grid.iterdir()
        if (p / "metrics.json").is_file()
    ]
    assert len(values) == 2
    import statistics

    expected = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (n=2)"
    table = (grid / "report" / "report.md").read_text()
    assert "| base | " + expected in table
    assert "pipeline check, NOT GPT-2 results" in table  # a random-init grid is labelled as such


def synthetic_grid(tmp_path, variants: dict[str, list[float]]):
    from train.run.index import RUNS_COLUMNS

    lines = ["\t".join(RUNS_COLUMNS)]
    for variant, values in variants.items():
        for seed, value in enumerate(values):
            row = {c: "" for c in RUNS_COLUMNS}
            row.update(
                run=f"sst-{variant}-s{seed}",
                task="sst",
                variant=variant,
                config_hash=f"{variant}-hash",
                seed=seed,
                metric="dev_acc",
                best_value=value,
                trainable_params=1000 if variant == "base" else 10,
                train_seconds=1.5,
                peak_memory_mb=100,
                run_dir=str(tmp_path / "gone" / f"sst-{variant}-s{seed}"),  # folders gone: rows only
            )
            lines.append("\t".join(str(row[c]) for c in RUNS_COLUMNS))
    grid = tmp_path / "synthetic"
    grid.mkdir()
    (grid / "runs.tsv").write_text("\n".join(lines) + "\n")
    return grid


def report_rows(grid):
    from experiments import report

    assert report.main([str(grid)]) == 0
    table = (grid / "report" / "report.md").read_text().split("Cost per task")[0]  # the metric table
    return {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}


def test_noise_is_not_marked_and_a_planted_gap_is(tmp_path):
    rows = report_rows(
        synthetic_grid(
            tmp_path,
            {
                "base": [0.50, 0.52, 0.51],
                "same_but_other_seeds": [0.51, 0.50, 0.52],
                "planted_gain": [0.80, 0.81, 0.79],
                "planted_loss": [0.20, 0.22, 0.21],
            },
        )
    )
    assert "▲" not in rows["same_but_other_seeds"] and "▼" not in rows["same_but_other_seeds"]
    assert "▲" in rows["planted_gain"] and "▼" in rows["planted_loss"]
    assert "▲" not in rows["base"]


def test_single_seed_is_never_marked(tmp_path):
    rows = report_rows(synthetic_grid(tmp_path, {"base": [0.5], "other": [0.9]}))
    assert "▲" not in rows["other"]


@pytest.mark.parametrize(
    "name, size", [("metric_vs_params.png", (360, 420)), ("training_curves.png", (360, 420)), ("cost.png", (240, 1000))]
)
def test_plots_decode_with_expected_size(tmp_path, name, size):
    grid = synthetic_grid(tmp_path, {"base": [0.5, 0.6], "lora": [0.55, 0.56]})
    report_rows(grid)
    image = matplotlib.image.imread(grid / "report" / name)
    assert image.shape[:2] == size
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_preset_files_parse():
    from experiments.ablate import load_preset

    for preset in PRESETS.glob("*.toml"):
        loaded = load_preset(preset)
        assert loaded.variants and loaded.seeds


def test_bad_preset_flags_and_broken_runs_tsv_are_named(tmp_path, tokenizer_dir):
    from experiments import ablate, report

    preset = tiny_grid(tmp_path, tokenizer_dir)
    preset.write_text(preset.read_text().replace("base = []", 'base = []\nbroken = ["--lora_rank", "4"]'))
    with pytest.raises(SystemExit, match="variant 'broken'"):
        ablate.main([str(preset), "--out_dir", str(tmp_path / "grid"), "--dry_run"])
    grid = synthetic_grid(tmp_path, {"base": [0.5, 0.6]})
    lines = (grid / "runs.tsv").read_text().splitlines()
    lines[2] = lines[2].replace("\t0.6\t", "\tnot-a-number\t")
    (grid / "runs.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"runs\.tsv:3: unreadable row"):
        report.main([str(grid)])
    (grid / "runs.tsv").unlink()
    (grid / "runs.tsv").mkdir()  # a folder where the index belongs: one line, not a hang or a traceback
    with pytest.raises(SystemExit, match=r"runs\.tsv is a folder, not the grid's index"):
        report.main([str(grid)])


def test_gpus_run_one_job_per_gpu_and_queue_the_rest(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """--gpus 0,3 on a (faked) 4-GPU box: 4 runs, never two at once on one GPU, each job sees only
    its GPU (CUDA_VISIBLE_DEVICES) and is told --device cuda."""
    import threading

    from experiments import ablate, jobs

    preset = write_grid_preset(tmp_path / "grid.toml", tokenizer_dir, "gpu-test", train_limit=4)
    preset.write_text(preset.read_text().replace("seeds = [1, 2]", "seeds = [1, 2, 3, 4]"))
    monkeypatch.setattr(ablate.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ablate.torch.cuda, "device_count", lambda: 4)
    lock, busy, seen = threading.Lock(), set(), []

    class FakeJob:
        def __init__(self, command, env, **kwargs):
            self.gpu, self.command = env["CUDA_VISIBLE_DEVICES"], command
            with lock:
                assert self.gpu not in busy, f"two jobs on GPU {self.gpu}"
                busy.add(self.gpu)
                seen.append((self.gpu, command[-2:]))

        def wait(self):
            time.sleep(0.2)
            with lock:
                busy.discard(self.gpu)
            return 0

    monkeypatch.setattr(jobs.subprocess, "Popen", FakeJob)
    assert ablate.main([str(preset), "--out_dir", str(tmp_path / "grid"), "--gpus", "0,3"]) == 0
    assert len(seen) == 4 and {gpu for gpu, _ in seen} == {"0", "3"}
    assert all(tail == ["--device", "cuda"] for _, tail in seen)
    with pytest.raises(SystemExit):
        ablate.main([str(preset), "--out_dir", str(tmp_path / "grid"), "--gpus", "0,4"])
    assert "this machine has 4 CUDA device(s)" in capsys.readouterr().err


@pytest.mark.slow
def test_transfer_grid_runs_its_second_stage_and_reports_it(tmp_path, tokenizer_dir, capsys):
    """A [transfer] preset: the source run, then its transfer run, from-scratch control and CKA; the
    report's transfer table shows their numbers; re-running does nothing."""
    from experiments import ablate, report

    preset = write_grid_preset(
        tmp_path / "transfer.toml",
        tokenizer_dir,
        "transfer-test",
        train_limit=32,
        dev_limit=8,
        test_limit=2,
        epochs=1,
        batch_size=8,
    )
    text = preset.read_text().replace("seeds = [1, 2]", "seeds = [1]").replace("base = []", 'lora = ["--use_lora"]')
    text = text.replace('baseline = "base"', 'baseline = "lora"')  # (a baseline must be one of the variants)
    text += (
        '[transfer]\npairs = [["sst", "cfimdb"]]\ntarget_fraction = 0.01\nepochs = 1\n'
        'flags = ["--dev_limit", "16", "--test_limit", "2"]\n[cka]\nn = 16\n'
    )
    preset.write_text(text)
    grid = tmp_path / "grid"
    inputs = inprocess_inputs(tokenizer_dir)
    assert ablate.main([str(preset), "--out_dir", str(grid), *inputs]) == 0
    manifest = json.loads((grid / "transfer.json").read_text())
    (item,) = manifest["runs"]
    moved = json.loads((Path(item["transfer_run"]) / "metrics.json").read_text())
    scratch = json.loads((Path(item["scratch_run"]) / "metrics.json").read_text())
    cka = json.loads(Path(item["cka"]).read_text())
    assert moved["source"]["run_dir"] == item["source_run"] and "transfer" in moved and "zero_shot" in moved
    assert "transfer" not in scratch and scratch["dev_majority_acc"] == moved["transfer"]["dev_majority_acc"]

    capsys.readouterr()
    assert ablate.main([str(preset), "--out_dir", str(grid), *inputs]) == 0
    printed = capsys.readouterr().out
    assert "1 runs, 1 already done, 0 to run" in printed and "3 jobs" in printed and "0 to run" in printed

    assert report.main([str(grid)]) == 0
    table = (grid / "report" / "report.md").read_text()
    main_rows = [line for line in table.split("Cost per task")[0].splitlines() if line.startswith("| lora")]
    assert len(main_rows) == 1 and "(n=1)" in main_rows[0]  # the transfer stage's runs stay out of it
    (row,) = [line for line in table.split("### sst → cfimdb")[1].splitlines() if line.startswith("| lora")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    expected = [
        json.loads((Path(item["source_run"]) / "metrics.json").read_text())["dev_acc"],
        moved["zero_shot"]["dev_acc"],
        moved["dev_acc"],
        scratch["dev_acc"],
        moved["dev_acc"] - scratch["dev_acc"],
        cka["summary"]["last_token"]["a_cross_block_mean"],
    ]
    assert cells[1:] == [f"{value:.4f} ± 0.0000 (n=1)" for value in expected]
    assert f"{moved['dev_majority_acc']:.4f}" in table.split("### sst → cfimdb")[1]
    assert (grid / "report" / "transfer.png").stat().st_size > 10_000


@pytest.mark.slow
def test_xlora_stage_mixes_the_grids_lora_runs_and_is_a_row_of_the_report(tmp_path, tokenizer_dir, capsys):
    """An [xlora] preset: the two LoRA-flavour runs, then an X-LoRA run whose experts are those runs
    (same seed); it is a row of the report, counted in the planned runs; re-running does nothing."""
    from experiments import ablate, report

    preset = write_grid_preset(
        tmp_path / "xlora.toml", tokenizer_dir, "xlora-test", train_limit=16, dev_limit=8, test_limit=2, epochs=1
    )
    text = preset.read_text().replace("seeds = [1, 2]", "seeds = [1]").replace('baseline = "base"', 'baseline = "lora"')
    text = text.replace("base = []", 'lora = ["--use_lora"]\nrslora = ["--use_lora", "--lora_rslora"]')
    preset.write_text(text + '[xlora]\nexperts = ["lora", "rslora"]\noptions = {xlora_depth = 2, xlora_size = 8}\n')
    grid = tmp_path / "grid"
    inputs = inprocess_inputs(tokenizer_dir)
    assert ablate.main([str(preset), "--out_dir", str(grid), *inputs, "--dry_run"]) == 0
    assert "then, once the expert runs (['lora', 'rslora']) are done: 1 X-LoRA runs" in capsys.readouterr().out
    assert ablate.main([str(preset), "--out_dir", str(grid), *inputs]) == 0
    (mixed,) = grid.glob("sst-peft-xlora-*")
    record = json.loads((mixed / "config.json").read_text())
    adapters = record["config"]["peft_config"]["adapters"]
    assert sorted(adapters) == ["lora-sst", "rslora-sst"]
    (lora_run,) = grid.glob("sst-lora-r8-a16-lr*")
    assert Path(adapters["lora-sst"]["path"]).parent.parent == lora_run  # <run>/exports/peft-<checkpoint>
    assert record["config"]["peft_config"]["xlora_depth"] == 2

    capsys.readouterr()
    assert ablate.main([str(preset), "--out_dir", str(grid), *inputs]) == 0
    printed = capsys.readouterr().out
    assert "X-LoRA stage: 1 runs, 1 already done, 0 to run" in printed
    assert report.main([str(grid)]) == 0
    table = (grid / "report" / "report.md").read_text()
    assert "3 of 3 planned runs have finished" in table
    assert [line for line in table.split("Cost per task")[0].splitlines() if line.startswith("| xlora")]


@pytest.mark.parametrize(
    "table, message",
    [
        ('experts = ["dora"]', "experts must list variants of the grid"),
        ("experts = []", "experts must list variants"),
        ('experts = ["base"]\ntasks = ["quora"]', "tasks ['quora'] are not tasks of the grid"),
        ('experts = ["base"]\nexpert_tasks = ["sonnet"]', "expert_tasks ['sonnet']"),
        ('experts = ["base"]\nlabel = "base"', "also a variant's name"),
        ('experts = ["base"]\nrounds = 2', "has no key(s) ['rounds']"),
    ],
)
def test_a_bad_xlora_table_is_one_error_line(tmp_path, tokenizer_dir, table, message):
    from experiments import planning
    from experiments.inputs import InputError

    preset = write_grid_preset(tmp_path / "bad.toml", tokenizer_dir, "bad")
    preset.write_text(preset.read_text() + f"[xlora]\n{table}\n")
    with pytest.raises(InputError, match=re.escape(message)):
        planning.load_preset(preset)


def test_a_run_another_grid_took_first_is_left_to_it_not_failed(tmp_path, tokenizer_dir, capsys):
    """Two grids on one out_dir: the second's job for a run the first holds exits 2 (the folder is busy);
    that run is counted as the other grid's, not as failed, and its log keeps the other job's lines."""
    from experiments import jobs, planning
    from train.run.folder import owned

    preset = tiny_grid(tmp_path, tokenizer_dir)
    grid = tmp_path / "grid"
    inputs = ["--tokenizer", str(tokenizer_dir), "--data_dir", str(DATA_DIR)]
    run = planning.plan(planning.load_preset(preset), grid, inputs)[0]
    log_dir = grid / "logs"
    log_dir.mkdir(parents=True)
    (log_dir / f"{run.name}.log").write_text("the other grid's job\n")

    class BusyJobs:  # the second grid's job: started, found the folder held, exited 2
        def describe(self):
            return ""

        def execute(self, planned, threads, logs):
            with open(logs / f"{planned.name}.log", "a") as log:
                log.write("error: busy\n")
            return planned, 2, 0.1

    run.run_dir.mkdir(parents=True)
    with owned(run.run_dir):  # the first grid's run holds the folder
        (run.run_dir / "config.json").write_text("{}")
        outcome = jobs.run_jobs(BusyJobs(), [run], 1, 1, log_dir)
    assert outcome["failed"] == [] and outcome["elsewhere"] == [run]
    assert "held by another process" in capsys.readouterr().out
    # a real job appends to the run's log (here one that stops at a bad flag): earlier lines are kept
    import dataclasses

    bad = dataclasses.replace(run, argv=["--no_such_flag"])
    shutil.rmtree(run.run_dir)
    _, code, _ = jobs.Jobs().execute(bad, 1, log_dir)
    text = (log_dir / f"{run.name}.log").read_text()
    assert code == 2 and text.startswith("the other grid's job\nerror: busy\n=== ") and "error:" in text[40:]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t + "[comon]\nepochs = 1\n", "unknown key(s) or table(s) ['comon']"),
        (lambda t: t.replace('random_init = "tiny"', 'random_init = "tiny"\nrandom_nit = "x"'), "[model] has unknown"),
        (lambda t: t + '[task_flags]\nsts = ["--lr", "1e-3"]\n', "[task_flags] has unknown key(s) ['sts']"),
        (lambda t: t + '[transfer]\npairs = [["sst", "cfimdb"]]\nfractionz = [0.1]\n', "['fractionz']"),
        (lambda t: t + "[cka]\nlayerz = [0]\n", "[cka] has unknown key(s) ['layerz']"),
        (lambda t: t.replace("[model]", "cka = 3\n[model]"), "cka must be a table"),
        (lambda t: t.replace("seeds = [1, 2]", 'seeds = "1, 2"'), "seeds must be a non-empty list of integers"),
        (lambda t: t.replace("seeds = [1, 2]", "seeds = [1, 2.5]"), "seeds must be a non-empty list of integers"),
        (lambda t: t.replace("base = []", 'base = "--use_lora"'), "variants must be a table of variant = [its flags]"),
        (lambda t: t.replace('baseline = "base"', 'baseline = "lora"'), "baseline 'lora' is not one of the variants"),
        (lambda t: t.replace('tasks = ["sst"]', "tasks = []"), "tasks must be a non-empty list of task names"),
        (lambda t: t.replace("[model]", 'task_flags = ["--lr", "1"]\n[model]'), "task_flags must be a table"),
    ],
)
def test_an_unknown_or_mistyped_preset_table_or_key_is_refused(tmp_path, tokenizer_dir, edit, message):
    """A misspelt table or key (or one from a newer version) would otherwise be dropped without a word;
    a value of the wrong type would fail later, inside planning, with a traceback."""
    from experiments import planning
    from experiments.inputs import InputError

    preset = write_grid_preset(tmp_path / "bad.toml", tokenizer_dir, "bad")
    preset.write_text(edit(preset.read_text()))
    with pytest.raises(InputError, match=re.escape(message)):
        planning.load_preset(preset)


@pytest.mark.slow
def test_the_inprocess_and_local_launchers_give_the_same_rows(tmp_path, tokenizer_dir):
    """Two runs (one variant, two seeds) through each launcher: the same runs.tsv rows, all but the
    columns that time a run or say where it lies; the in-process runs' output is in their logs."""
    from experiments import ablate
    from train.run.index import read_index

    preset = tiny_grid(tmp_path, tokenizer_dir)
    rows = {}
    for launcher in ("inprocess", "local"):
        grid = tmp_path / launcher
        assert ablate.main([str(preset), "--out_dir", str(grid), "--launcher", launcher, "--threads", "1"]) == 0
        rows[launcher] = sorted(read_index(grid), key=lambda row: row["run"])
        (log,) = {p.read_text() for p in (grid / "logs").glob("*s1*.log")}
        assert "done sst-" in log  # the run's own lines went to its log, in process too
    when = {"train_seconds", "seconds_per_step", "peak_memory_mb", "run_dir", "finished_at", "generation_seconds"}
    assert len(rows["local"]) == 2
    for inprocess, local in zip(rows["inprocess"], rows["local"], strict=True):
        assert {k: v for k, v in inprocess.items() if k not in when} == {
            k: v for k, v in local.items() if k not in when
        }


def test_an_inprocess_job_that_crashes_is_failed_and_a_caught_signal_stops_the_grid(tmp_path, monkeypatch):
    """As under --launcher local: a crash is exit 1 (its traceback in the job's log) and the grid goes
    on; a signal the run caught stops the grid, even when the run finished anyway."""
    import signal as signals

    from experiments import jobs, planning
    from train.cli import entry
    from train.trainer.lifecycle import StopSignals

    run = planning.PlannedRun("sst", "base", 1, ["--task", "sst"], "train", tmp_path / "sst-base-s1")
    logs = tmp_path / "logs"
    logs.mkdir()

    def crash(argv):
        raise RuntimeError("a bug in the run")

    monkeypatch.setattr(entry, "main", crash)
    inprocess = jobs.InProcessJobs()
    _, code, _ = inprocess.execute(run, 1, logs)
    assert code == 1 and inprocess.stop_signal is None
    assert "RuntimeError: a bug in the run" in (logs / f"{run.name}.log").read_text()

    def finished_despite_a_signal(argv):
        StopSignals.last_received = signals.SIGTERM  # what its StopSignals record when a signal arrives
        return 0

    monkeypatch.setattr(entry, "main", finished_despite_a_signal)
    _, code, _ = inprocess.execute(run, 1, logs)
    assert code == 0 and inprocess.stop_signal == signals.SIGTERM  # no further job starts
    _, code, _ = inprocess.execute(run, 1, logs)
    assert code is None  # not started
