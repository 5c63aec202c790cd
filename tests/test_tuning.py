"""The learning-rate tuning stage (experiments/tuning.py, ablate's [tune] table): every method declares a
prior, the choice is the best dev score (ties to the middle, ends marked), a planted pair of variants gets
two different rates, tuning runs never read the test split, a killed stage resumes without duplicates,
and the dry run's count is the number of runs trained."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import ablate, planning, tuning
from experiments.inputs import InputError
from model.config import GPT2Config
from modules.peft_methods import METHODS, SUPPORTED
from modules.registry import VARIANTS
from tests.conftest import DATA_DIR, REPO, kill_and_wait, plugin_env, run_command, start_grid


def write_preset(path: Path, tokenizer_dir: Path, variants: dict, tune: str, data_dir: Path = DATA_DIR, **common):
    """A one-task (sst) grid on the tiny random checkpoint with a [tune] table."""
    flags = {
        "data_dir": str(data_dir),
        "tokenizer": str(tokenizer_dir),
        "train_limit": 16,
        "dev_limit": 8,
        "test_limit": 4,
        "batch_size": 4,
        "max_steps": 2,
        "wandb": "disabled",
        **common,
    }
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in flags.items())
    rows = "\n".join(f"{name} = {json.dumps(v)}" for name, v in variants.items())
    path.write_text(
        f'name = "tune-test"\ntasks = ["sst"]\nseeds = [1]\n[model]\nrandom_init = "tiny"\n[common]\n{lines}\n'
        f"[variants]\n{rows}\n[tune]\n{tune}\n"
    )
    return path


# ---------------------------------------------------------------- priors


def test_every_variant_and_peft_method_declares_a_prior_with_its_source():
    assert set(METHODS) == set(SUPPORTED)
    for method, prior in ((name, record.lr) for name, record in METHODS.items()):
        assert 0 < prior.low < prior.high and prior.source, method
    for variant in VARIANTS.values():
        assert variant.lr_prior is not None, variant.name
    from modules.variant import LrPrior, Settings, Variant, register

    with pytest.raises(ValueError, match="learning-rate range"):
        register(Variant("nolr", Settings, lambda c: False, None, str, "nolr", not_mergeable="x"))
    with pytest.raises(ValueError, match="0 < low <= high"):
        LrPrior(1e-3, 1e-4, "backwards")
    with pytest.raises(ValueError, match="source"):
        LrPrior(1e-4, 1e-3, "")


def test_a_configs_prior_follows_its_method_mode_and_variants():
    tiny = GPT2Config.from_preset
    assert tuning.config_prior(tiny("tiny", use_lora=True)) is VARIANTS["lora"].prior(tiny("tiny", use_lora=True))
    pissa = tuning.config_prior(tiny("tiny", use_lora=True, lora_init="pissa"))
    assert pissa.high < 1e-3 and "PiSSA" in pissa.source
    ia3 = tuning.config_prior(tiny("tiny", peft_method="ia3"))
    assert (ia3.low, ia3.high) == (METHODS["ia3"].lr.low, METHODS["ia3"].lr.high)
    full = tuning.config_prior(tiny("tiny"))
    assert full.low == 1e-5 and "full fine-tuning" in full.source
    probe = tuning.config_prior(tiny("tiny", fine_tune_mode="last-linear-layer"))
    assert probe.low == 1e-4 and probe.high == 1e-2
    # several variants at once: the hull of their ranges, naming each
    both = tuning.config_prior(tiny("tiny", use_lora=True, use_graph=True))
    lora, graph = VARIANTS["lora"].prior(tiny("tiny", use_lora=True)), VARIANTS["graph"].lr_prior
    assert (both.low, both.high) == (min(lora.low, graph.low), max(lora.high, graph.high))
    assert "lora" in both.source and "graph" in both.source


def test_prior_candidates_are_log_spaced_with_exact_ends():
    prior = METHODS["ia3"].lr
    settings = tuning.TuneSettings(points=5)
    rates = tuning.candidates(settings, prior)
    assert rates[0] == prior.low and rates[-1] == prior.high and len(rates) == 5
    ratios = [b / a for a, b in zip(rates[:-1], rates[1:], strict=True)]
    assert all(math.isclose(r, ratios[0], rel_tol=0.01) for r in ratios)
    assert tuning.candidates(tuning.TuneSettings(lr=(1e-4, 3e-4)), prior) == [1e-4, 3e-4]


# ---------------------------------------------------------------- the choice


def trials(*outcomes):
    """Trials at 1e-5, 1e-4, ... with these dev scores ('d': diverged, 'p': pending)."""
    made = []
    for i, value in enumerate(outcomes):
        trial = tuning.Trial(10.0 ** (i - 5), Path(f"run{i}"))
        if value == "d":
            trial.outcome = "diverged"
        elif value != "p":
            trial.outcome, trial.dev = "finished", value
        made.append(trial)
    return made


def test_the_choice_is_the_best_dev_score_with_ends_and_ties_marked():
    middle = tuning.choose(trials(0.2, 0.5, 0.3))
    assert middle.lr == 1e-4 and middle.edge is None and not middle.flat
    assert middle.chosen_by == ["run0", "run1", "run2"]
    assert tuning.choose(trials(0.5, 0.3, 0.2)).edge == "low"
    high = tuning.choose(trials(0.1, 0.3, "d", 0.6))
    assert high.lr == 1e-2 and high.edge == "high"  # a diverged candidate scores below every other
    assert tuning.choose(trials(0.4, "d", "d")).lr == 1e-5
    flat = tuning.choose(trials(0.3, 0.3, 0.3, 0.3, 0.3))
    assert flat.flat and flat.lr == 1e-3 and flat.edge is None  # the middle of a flat curve
    assert tuning.choose(trials(0.1, 0.4, 0.4)).edge == "high"  # a plateau reaching the end
    assert tuning.choose(trials(0.1, "p", 0.4)) is None  # not until every trial has finished
    assert tuning.choose(trials("d", "d")) is None  # nothing finished: no rate
    assert tuning.choose(trials(0.4, 0.1, 0.4)).lr == 1e-5  # non-adjacent ties: the lower middle
    assert tuning.choose(trials(0.3)).edge is None  # one candidate has no range to widen
    unreadable = trials(0.2, 0.5, 0.3)
    unreadable[1].outcome, unreadable[1].dev = "unreadable", None
    assert tuning.choose(unreadable).lr == 1e-3  # scored like a diverged candidate, never pending


def test_a_damaged_tuning_record_is_unreadable_not_pending(tmp_path):
    (tmp_path / "metrics.json").write_text('{"best_value": "x"}')
    assert tuning.read_trial(1e-4, tmp_path).outcome == "unreadable"
    (tmp_path / "metrics.json").write_text(json.dumps({"best_value": 0.5, "steps": 3, "train_seconds": 1.5}))
    trial = tuning.read_trial(1e-4, tmp_path)
    assert (trial.outcome, trial.dev, trial.steps, trial.seconds) == ("finished", 0.5, 3, 1.5)
    (tmp_path / "metrics.json").unlink()
    assert tuning.read_trial(1e-4, tmp_path).outcome == "pending"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("lr = 0.1", 'lr must be "prior"'),
        ("lr = [1e-4]", "at least two"),
        ("lr = [1e-4, -1.0]", "at least two learning rates > 0"),
        ("lr = [1e-4, 1e-4]", "twice"),
        ("points = 1", "points must be a whole number >= 2"),
        ("lr = [1e-4, 1e-3]\npoints = 3", "points applies to"),
        ("epochs = 0", "epochs must be"),
        ('seed = "x"', "seed must be"),
        ("budget = 3", "has no key(s) ['budget']"),
        ("max_steps = 0", "max_steps must be a whole number >= 1"),
        ("lr = [true, false]", "at least two learning rates > 0"),
    ],
)
def test_a_bad_tune_table_is_one_error_line(tmp_path, tokenizer_dir, table, message):
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, {"lora": ["--use_lora"]}, table)
    with pytest.raises(InputError) as error:
        planning.load_preset(preset)
    assert str(error.value).startswith(f"error: {preset}: [tune]") and message in str(error.value)


def test_a_tune_key_that_is_not_a_table_is_one_error_line(tmp_path, tokenizer_dir):
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, {"lora": ["--use_lora"]}, "seed = 0")
    preset.write_text("tune = 3\n" + preset.read_text().replace("[tune]\nseed = 0\n", ""))
    with pytest.raises(InputError, match=r"\[tune\] must be a table"):
        planning.load_preset(preset)


def test_a_tune_seed_among_the_grids_seeds_and_a_misspelt_table_are_refused(tmp_path, tokenizer_dir):
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, {"lora": ["--use_lora"]}, "seed = 1\nmax_steps = 2")
    with pytest.raises(InputError, match=r"\[tune\] seed 1 is one of the grid's seeds \[1\]"):
        planning.load_preset(preset)
    preset.write_text(preset.read_text().replace("[tune]\nseed = 1", "[tunes]\nseed = 0"))
    with pytest.raises(InputError, match=r"unknown key\(s\) or table\(s\) \['tunes'\]"):
        planning.load_preset(preset)


# ---------------------------------------------------------------- the planted case


def finish_trial(run: planning.PlannedRun, dev: float | None) -> None:
    """Plant a tuning run's outcome in its folder: finished with this dev score, or diverged (None)."""
    run.run_dir.mkdir(parents=True)
    if dev is None:
        (run.run_dir / "diverged.json").write_text(json.dumps({"step": 1, "reason": "planted"}))
    else:
        metrics = {"best_value": dev, "steps": 2, "train_seconds": 0.5, "metric": "dev_acc", "best_step": 2}
        (run.run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_two_variants_whose_best_rates_differ_tenfold_each_get_their_own(tmp_path, tokenizer_dir):
    """Planted dev scores: LoRA is best at 1e-4, IA3 at 1e-3 (and diverges at 1e-2). The final runs must
    carry each variant's own best rate; one shared rate fails."""
    variants = {"lora": ["--use_lora"], "ia3": ["--peft_method", "ia3"]}
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, variants, "lr = [1e-4, 1e-3, 1e-2]\nseed = 0")
    grid_dir = tmp_path / "grid"
    grid = planning.plan_grid(planning.load_preset(preset), grid_dir, [])
    assert grid.runs == [] and grid.waiting == 2 and len(grid.tuning) == 6
    assert all("--no-predict_test" in run.argv and run.stage == "tune" for run in grid.tuning)
    planted = {("lora", "0.0001"): 0.6, ("lora", "0.001"): 0.4, ("lora", "0.01"): 0.2}
    planted |= {("ia3", "0.0001"): 0.3, ("ia3", "0.001"): 0.7, ("ia3", "0.01"): None}
    for run in grid.tuning:
        finish_trial(run, planted[(run.variant, planning.run_lr(run))])
    grid = planning.plan_grid(planning.load_preset(preset), grid_dir, [])
    rates = {run.variant: planning.run_lr(run) for run in grid.runs}
    assert rates == {"lora": "0.0001", "ia3": "0.001"}
    for run in grid.runs:
        start = run.argv.index("--lr_chosen_by") + 1
        names = [r.run_dir.name for r in grid.tuning if r.variant == run.variant]
        assert run.argv[start : start + len(names)] == names and not run.argv[start + len(names)].startswith("sst-")
        assert run.argv[run.argv.index("--stage") + 1] == "final"
    cells = {c["variant"]: c for c in grid.cells}
    assert cells["lora"]["edge"] == "low" and cells["ia3"]["edge"] is None
    assert [t["outcome"] for t in cells["ia3"]["trials"]] == ["finished", "finished", "diverged"]


def test_the_report_marks_a_best_rate_at_the_end_of_the_range(tmp_path):
    from experiments import report

    cell = {
        "variant": "lora",
        "task": "sst",
        "prior": {"low": 1e-4, "high": 1e-3, "source": "x"},
        "trials": [
            {"lr": 1e-4, "outcome": "finished", "dev": 0.2, "steps": 2, "seconds": 1.0, "run": "a"},
            {"lr": 1e-3, "outcome": "finished", "dev": 0.5, "steps": 2, "seconds": 1.0, "run": "b"},
        ],
        "chosen_lr": 1e-3,
        "edge": "high",
        "flat": False,
        "status": "chosen",
    }
    inner = {**cell, "variant": "ia3", "edge": None, "chosen_lr": 1e-4}
    inner["trials"] = [dict(t, dev=d) for t, d in zip(cell["trials"], (0.6, 0.1), strict=True)]
    record = {"settings": {"lr": "prior", "points": 2, "seed": 0, "epochs": 1, "max_steps": None}}
    rows = [{"variant": "lora", "task": "sst", "steps": "4", "train_seconds": 3.0}]
    text = report.tuning_section({**record, "cells": [cell, inner]}, rows, tmp_path / "s.png")
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "▶ widen" in lines["| lora"] and "**0.001: 0.5000**" in lines["| lora"]
    assert "widen" not in lines["| ia3"] and "**0.0001: 0.6000**" in lines["| ia3"]
    assert "| 4 | 2.0 | 4 | 3.0 | 40% |" in lines["| lora"]  # tuning 2 s of 5 s in all
    assert (tmp_path / "s.png").stat().st_size > 0


# ---------------------------------------------------------------- end to end


def broken_test_split(tmp_path: Path) -> Path:
    """The task data with SST's test file replaced by rows no loader accepts."""
    folder = tmp_path / "data"
    folder.mkdir()
    for path in DATA_DIR.iterdir():
        (folder / path.name).symlink_to(path)
    (folder / "ids-sst-test-student.csv").unlink()
    (folder / "ids-sst-test-student.csv").write_text("0\t\tid\tsentence\nbroken\n")
    return folder


def dry_run(preset: Path, tmp_path: Path, capsys, planned: str) -> tuple[Path, list[str]]:
    """The grid's folder and ablate command line, after its dry run printed the `planned` count."""
    grid = tmp_path / "grid"
    command = [str(preset), "--out_dir", str(grid), "--threads", "1", "--launcher", "inprocess"]
    assert ablate.main([*command, "--dry_run"]) == 0
    assert planned in capsys.readouterr().out
    return grid, command


@pytest.mark.slow
def test_tuning_runs_never_read_the_test_split_and_the_dry_run_counts_every_run(tmp_path, tokenizer_dir, capsys):
    data = broken_test_split(tmp_path)
    variants = {"base": [], "lora": ["--use_lora"]}
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, variants, "lr = [1e-4, 1e-3]\nseed = 0", data)
    grid, command = dry_run(preset, tmp_path, capsys, "planned: 4 tuning runs + 2 final runs = 6 runs")
    # the tuning runs finish on data whose test split cannot be read; the final runs, which read it, fail
    assert ablate.main(command) == 1
    out = capsys.readouterr().out
    assert "tuning stage done: 2 of 2 cells chose a rate" in out and out.count("FAILED") == 2
    record = json.loads((grid / "tuning.json").read_text())
    trials = [t for cell in record["cells"] for t in cell["trials"]]
    assert len(trials) == 4 and all(t["outcome"] == "finished" for t in trials)
    for trial in trials:
        folder = Path(trial["run_dir"])
        assert not list(folder.rglob("*test-output*")), folder
        assert json.loads((folder / "config.json").read_text())["training"]["predict_test"] is False
    # with the test split mended, a re-run trains the final runs only, at the chosen rates
    (data / "ids-sst-test-student.csv").unlink()
    (data / "ids-sst-test-student.csv").symlink_to(DATA_DIR / "ids-sst-test-student.csv")
    assert ablate.main(command) == 0
    assert "4 tuning runs (4 already done, 0 to run), then 2 final runs" in capsys.readouterr().out
    finished = sorted(p.parent for p in grid.glob("*/metrics.json"))
    assert len(finished) == 6  # what the dry run counted
    for cell in record["cells"]:
        (final,) = [
            p for p in finished if p.name.startswith("sst-") and "-s1-" in p.name and _label(p) == cell["variant"]
        ]
        config = json.loads((final / "config.json").read_text())["training"]
        assert config["lr"] == cell["chosen_lr"] and config["stage"] == "final"
        assert sorted(config["lr_chosen_by"]) == sorted(t["run"] for t in cell["trials"])
        assert list(final.rglob("sst-test-output.csv"))  # a final run does predict the test split
    rows = (grid / "runs.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    stages = sorted(dict(zip(header, r.split("\t"), strict=True))["stage"] for r in rows[1:])
    assert stages == ["final", "final", "tune", "tune", "tune", "tune"]
    from experiments import report

    assert report.main([str(grid)]) == 0
    text = (grid / "report" / "report.md").read_text()
    assert "## Learning-rate tuning" in text and "2 of 2 planned runs have finished" in text
    assert "at a budget of 1 epoch(s) (2 optimizer steps a candidate)" in text  # the preset's max_steps capped it
    assert (grid / "report" / "lr_sensitivity.png").is_file()


def _label(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["label"]


@pytest.mark.slow
def test_a_grid_killed_in_its_tuning_stage_finishes_without_duplicates(tmp_path, tokenizer_dir):
    variants = {"lora": ["--use_lora"], "ia3": ["--peft_method", "ia3"]}
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, variants, "lr = [1e-4, 1e-3]\nseed = 0")
    grid = tmp_path / "grid"
    # its runs in the grid's process (--launcher inprocess): the SIGKILL takes the grid and its running run
    # at once, as the OOM killer or a lost machine would (a local job outliving its grid: test_ablate)
    cmd = [sys.executable, "-m", "experiments.ablate", str(preset), "--out_dir", str(grid), "--threads", "1"]
    cmd += ["--launcher", "inprocess"]
    proc = start_grid(cmd, GPT2_TEST_STEP_SLEEP="0.5")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if list(grid.glob("*-s0-*/metrics.json")):  # the first tuning run finished
            assert kill_and_wait(proc, group=True) == -signal.SIGKILL
            break
        time.sleep(0.05)
    assert proc.returncode == -signal.SIGKILL
    tuned_before = len(list(grid.glob("*-s0-*/metrics.json")))
    assert 1 <= tuned_before < 4
    again = run_command(cmd)  # (the kill needed a process; the re-run does not)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"4 tuning runs ({tuned_before} already done, {4 - tuned_before} to run)" in again.stdout
    folders = [p.parent.name for p in grid.glob("*/metrics.json")]
    assert len(folders) == 6 == len(set(folders))
    rows = (grid / "runs.tsv").read_text().splitlines()[1:]
    assert len(rows) == 6 and len({r.split("\t")[0] for r in rows}) == 6
    finished = run_command(cmd)
    assert "4 tuning runs (4 already done, 0 to run), then 2 final runs (2 already done, 0 to run" in finished.stdout


def test_the_methods_and_gpt2_presets_tune_every_method():
    smoke = planning.load_preset(REPO / "experiments" / "presets" / "methods_smoke.toml")
    assert smoke.tune.points == 2 and smoke.tune.seed not in smoke.seeds
    for name in ("methods", "gpt2"):
        preset = planning.load_preset(REPO / "experiments" / "presets" / f"{name}.toml")
        assert preset.tune.points == 5 and preset.tune.seed not in preset.seeds
        for task in preset.tasks:  # no variant, task or common flag fixes the rate: every cell is tuned
            for variant, flags in preset.variants.items():
                assert not planning.fixes_lr(planning.run_argv(preset, task, "gpt2", variant, flags, 1, Path("g"), []))


def test_grid_cost_counts_the_plan_and_its_steps(tmp_path, tokenizer_dir):
    variants = {"lora": ["--use_lora"], "kan": ["--use_kan"]}
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, variants, "lr = [1e-4, 1e-3]\nseed = 0")
    command = ["-m", "scripts.grid_cost", str(preset), "--data_dir", str(DATA_DIR)]
    done = run_command(command, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "4 tuning runs + 2 final runs + 0 X-LoRA runs" in done.stdout
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if "ms/step" in line}
    # every run stops at max_steps = 2: two candidates and one seed per variant
    assert "tuning         4 steps  final          2 steps" in lines["LoRA"]
    assert "KAN-FFN (mlp init)            326.9 ms/step" in lines["KAN-FFN"]
    # without max_steps: epochs x ceil(16 examples (train_limit) / batch 4); tuning 1 epoch, final 3
    preset.write_text(preset.read_text().replace("max_steps = 2", "epochs = 3"))
    done = run_command(command, cwd=REPO)
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if "ms/step" in line}
    assert f"tuning {2 * 4:>9,} steps  final {3 * 4:>10,} steps" in lines["LoRA"], done.stdout


def test_a_sonnet_run_without_test_predictions_never_opens_the_test_prompts(tmp_path, tokenizer_dir):
    from model.tokenizer import load_tokenizer
    from train.base.settings import TrainingSettings
    from train.tasks import TASKS

    data = broken_test_split(tmp_path)
    (data / "sonnets_held_out.txt").unlink()  # the test prompts: gone
    training = TrainingSettings(dev_limit=2)
    task = TASKS["sonnet"](load_tokenizer(tokenizer_dir), data, training, 128, predict_test=False)
    assert task.test_prompts == [] and len(task.dev_prompts) == 2
    with pytest.raises(Exception, match="sonnets_held_out"):
        TASKS["sonnet"](load_tokenizer(tokenizer_dir), data, training, 128)


def test_a_cell_without_a_rate_blocks_only_the_stages_that_need_it(tmp_path, tokenizer_dir):
    """X-LoRA waits for its expert cells' rates, not for an unrelated cell whose every candidate diverged."""
    variants = {"lora": ["--use_lora"], "ia3": ["--peft_method", "ia3"]}
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, variants, "lr = [1e-4, 1e-3]")
    preset.write_text(preset.read_text() + '[xlora]\nexperts = ["lora"]\n')
    loaded = planning.load_preset(preset)
    grid = planning.plan_grid(loaded, tmp_path / "grid", [])
    ready, why = planning.experts_ready(loaded, grid)
    assert not ready and "lora/sst (pending)" in why and "ia3" not in why
    for run in grid.tuning:
        finish_trial(run, 0.5 if run.variant == "lora" else None)  # every IA3 candidate diverges
    grid = planning.plan_grid(loaded, tmp_path / "grid", [])
    assert planning.without_rate(grid, ["sst"], list(variants)) == ["ia3/sst (all diverged)"]
    ready, why = planning.experts_ready(loaded, grid)
    assert not ready and why == "1 expert run(s) not finished"  # lora's final run, not ia3's missing rate
    (final,) = grid.runs
    finish_trial(final, 0.5)
    assert planning.experts_ready(loaded, planning.plan_grid(loaded, tmp_path / "grid", []))[0]


def test_the_report_leaves_out_final_runs_at_an_old_rate_and_a_grid_with_nothing_tuned(tmp_path):
    from experiments import report

    rows = [
        {"variant": "lora", "task": "sst", "stage": "final", "lr": "0.001"},
        {"variant": "lora", "task": "sst", "stage": "final", "lr": "0.0001"},
        {"variant": "lora", "task": "sst", "stage": "", "lr": "0.0002"},  # ran before the grid tuned it
        {"variant": "fixed", "task": "sst", "stage": "final", "lr": "0.0005"},
    ]
    record = {"cells": [{"variant": "lora", "task": "sst", "chosen_lr": 1e-4}]}
    assert [r["lr"] for r in report.current_finals(rows, record)] == ["0.0001", "0.0005"]
    assert report.current_finals(rows, None) == rows


@pytest.mark.slow
def test_xlora_rate_is_tuned_on_the_first_seeds_experts(tmp_path, tokenizer_dir, capsys):
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, {"lora": ["--use_lora"]}, "lr = [1e-4, 1e-3]")
    preset.write_text(preset.read_text() + '[xlora]\nexperts = ["lora"]\n')
    grid, command = dry_run(preset, tmp_path, capsys, "planned: 2 tuning runs + 1 final runs + 3 X-LoRA runs = 6 runs")
    assert ablate.main(command) == 0
    out = capsys.readouterr().out
    assert "X-LoRA tuning stage: 2 runs" in out and "X-LoRA stage: 1 runs" in out
    assert len(list(grid.glob("*/metrics.json"))) == 6  # what the dry run counted
    cells = {c["variant"]: c for c in json.loads((grid / "tuning.json").read_text())["cells"]}
    assert set(cells) == {"lora", "xlora"} and cells["xlora"]["status"] == "chosen"
    (lora_final,) = [p.parent for p in grid.glob("*-s1-*/metrics.json") if _label(p.parent) == "lora"]
    (xlora_final,) = [p.parent for p in grid.glob("*-s1-*/metrics.json") if _label(p.parent) == "xlora"]
    training = json.loads((xlora_final / "config.json").read_text())["training"]
    assert training["lr"] == cells["xlora"]["chosen_lr"] and training["stage"] == "final"
    assert sorted(training["lr_chosen_by"]) == sorted(t["run"] for t in cells["xlora"]["trials"])
    for trial in cells["xlora"]["trials"]:  # the tuning runs mix seed 1's LoRA run (seed 0 has none)
        record = json.loads((Path(trial["run_dir"]) / "config.json").read_text())
        assert str(lora_final) in json.dumps(record["config"]["peft_config"]) and record["training"]["stage"] == "tune"
    again = ablate.main(command)
    assert again == 0 and "X-LoRA stage: 1 runs, 1 already done, 0 to run" in capsys.readouterr().out


@pytest.mark.slow
def test_an_interrupted_tuning_stage_counts_against_the_whole_plan(tmp_path, tokenizer_dir):
    variants = {"lora": ["--use_lora"], "fixed": ["--use_lora", "--lr", "5e-4"]}
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, variants, "lr = [1e-4, 1e-3]")
    grid = tmp_path / "grid"
    cmd = [sys.executable, "-m", "experiments.ablate", str(preset), "--out_dir", str(grid), "--threads", "1"]
    cmd += ["--launcher", "inprocess"]  # (the signal's forwarding to a local job is tested in test_signals)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=plugin_env(GPT2_TEST_STEP_SLEEP="0.5"),
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list(grid.glob("*-s0-*/metrics.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # the running tuning run's own handler: it checkpoints and stops
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out
    # 2 tuning runs + lora's final run (waiting for its rate) + the fixed variant's final run
    assert "1 of 4 planned runs done (tuning runs included), 1 final runs wait for their tuning" in out, out


@pytest.mark.slow
def test_the_cluster_path_runs_every_stage_in_order(tmp_path, tokenizer_dir, capsys):
    """--launcher submitit_local --wait (the slurm path, run here): the tuning runs, then the final runs at
    the chosen rate, then X-LoRA's tuning runs and its runs, each submitted once what it needs is done."""
    preset = write_preset(tmp_path / "p.toml", tokenizer_dir, {"lora": ["--use_lora"]}, "lr = [1e-4, 1e-3]")
    preset.write_text(preset.read_text() + '[xlora]\nexperts = ["lora"]\n')
    grid = tmp_path / "grid"
    command = [str(preset), "--out_dir", str(grid), "--launcher", "submitit_local", "--wait", "--threads", "1"]
    assert ablate.main(command) == 0
    out = capsys.readouterr().out
    order = ["submitted 2 tuning runs", "submitted 1 runs", "submitted 2 X-LoRA tuning runs", "submitted 1 X-LoRA runs"]
    assert all(line in out for line in order) and "FAILED" not in out, out
    assert [out.index(line) for line in order] == sorted(out.index(line) for line in order)
    assert len(list(grid.glob("*/metrics.json"))) == 6
    cells = {c["variant"]: c for c in json.loads((grid / "tuning.json").read_text())["cells"]}
    assert cells["lora"]["status"] == cells["xlora"]["status"] == "chosen"
