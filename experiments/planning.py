"""A grid, planned: the preset (TOML) as a typed, checked value and the runs it stands for.

`load_preset(path)` reads and checks a preset (a `GridPreset`) (every table and key it may hold, each with one
`error:` line naming the file when wrong); `plan(preset, out_dir, inputs)` returns every run of the
grid (`PlannedRun`: its command, folder and stage), the learning-rate tuning stage, X-LoRA's and the
transfer stage included. Nothing here starts a run: experiments/jobs.py runs them here (one process
each, or in this process), experiments/launchers.py on SLURM; experiments/ablate.py is the command.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments import tuning
from experiments.inputs import InputError
from model.loading import read_checkpoint_config
from train.cli import entry
from train.cli.parse import ArgumentParser, render_argv
from train.run.folder import run_folder
from train.run.lock import lock_holder
from train.run.state import folder_state
from train.tasks import TASKS, labelled_tasks

REPO = Path(__file__).resolve().parents[1]


PRESETS = Path(__file__).resolve().parent / "presets"


MODULE = "train"  # python -m train --task <task> ...


@dataclass
class PlannedRun:
    task: str
    variant: str
    seed: int
    argv: list[str]  # everything after `python -m <module>`
    module: str
    run_dir: Path
    done_file: Path | None = None  # for jobs that are not training runs (CKA): done when this file exists
    stage: str | None = None  # a [tune] preset's runs: "tune" (a learning-rate trial) or "final"

    @property
    def name(self) -> str:
        """The job's own name (log file, job record): its run folder's; for an analysis, which writes into
        a sub-folder of the run it analyses (`<run>/cka`), `<run>-cka`."""
        return self.run_dir.name if self.done_file is None else f"{self.run_dir.parent.name}-{self.run_dir.name}"


PRESET_KEYS = {
    *("name", "tasks", "seeds", "baseline", "model", "common", "task_flags", "variants"),
    *("transfer", "cka", "xlora", "tune", "slurm"),
}


# the keys each table may hold (None: the grid's tasks)
TABLE_KEYS: dict[str, set[str] | None] = {
    "model": {"model", "random_init"},
    "transfer": {"pairs", "target_fraction", "epochs", "flags", "target_flags"},
    "cka": {"layers", "n"},
    "task_flags": None,
}


@dataclass(frozen=True)
class GridPreset:
    """A grid preset, read and checked (`load_preset`). The tables keep TOML's shape; each was checked
    for the keys it may hold."""

    path: Path
    name: str
    tasks: list[str]
    seeds: list[int]
    variants: dict[str, list[str]]  # name -> its extra flags
    baseline: str | None = None
    model: dict[str, str] = field(default_factory=dict)  # {"model": hub id or folder} or {"random_init": preset}
    common: dict[str, Any] = field(default_factory=dict)  # flags of every run (name = value)
    task_flags: dict[str, list[str]] = field(default_factory=dict)  # extra flags per task
    transfer: dict[str, Any] | None = None  # the transfer stage: pairs, target_fraction, epochs, flags, ...
    cka: dict[str, Any] = field(default_factory=dict)  # the transfer stage's CKA: layers, n
    xlora: dict[str, Any] | None = None  # the X-LoRA stage: experts, expert_tasks, tasks, options, label
    tune: tuning.TuneSettings | None = None  # the learning-rate tuning stage
    slurm: dict[str, Any] = field(default_factory=dict)  # SLURM resources (experiments/launchers.py)

    def point(self, task: str, variant: str, seed: int) -> GridPreset:
        """The same grid, reduced to one point (what a sweep agent runs)."""
        return dataclasses.replace(self, tasks=[task], variants={variant: self.variants[variant]}, seeds=[seed])


def _check_types(path: Path, preset: dict) -> None:
    """The top-level keys' types, each wrong one named in one line."""

    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    checks = {
        "name": (lambda v: isinstance(v, str) and v, "a non-empty string"),
        "tasks": (lambda v: strings(v) and v, "a non-empty list of task names"),
        "seeds": (
            lambda v: isinstance(v, list) and v and all(type(i) is int for i in v),
            "a non-empty list of integers",
        ),
        "variants": (
            lambda v: isinstance(v, dict) and v and all(strings(flags) for flags in v.values()),
            "a table of variant = [its flags]",
        ),
        "baseline": (lambda v: isinstance(v, str), "a variant's name"),
        "task_flags": (
            lambda v: isinstance(v, dict) and all(strings(flags) for flags in v.values()),
            "a table of task = [its flags]",
        ),
        "common": (lambda v: isinstance(v, dict), "a table of flag = value"),
    }
    for key, (valid, expected) in checks.items():
        if key in preset and not valid(preset[key]):
            raise InputError(f"error: {path}: {key} must be {expected}, not {preset[key]!r}"[:300])
    if preset.get("baseline") not in (None, *preset["variants"]):
        raise InputError(
            f"error: {path}: baseline {preset['baseline']!r} is not one of the variants {list(preset['variants'])}"
        )


def load_preset(path: Path) -> GridPreset:
    try:
        preset = tomllib.loads(path.read_text())
    except OSError as error:
        hint = f"; presets in experiments/presets: {sorted(p.name for p in PRESETS.glob('*.toml'))}"
        raise InputError(f"error: preset {path}: {error.strerror}{hint}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"error: {path}: {error}") from None
    for key in ("name", "tasks", "seeds", "variants"):
        if key not in preset:
            raise InputError(f"error: {path}: missing key {key!r}")
    unknown_keys = sorted(set(preset) - PRESET_KEYS)
    if unknown_keys:  # a misspelt table ([commn], [tunes]) would otherwise be dropped without a word
        raise InputError(f"error: {path}: unknown key(s) or table(s) {unknown_keys} (known: {sorted(PRESET_KEYS)})")
    _check_types(path, preset)
    unknown = [t for t in preset["tasks"] if t not in TASKS]
    if unknown:
        raise InputError(f"error: {path}: unknown task(s) {unknown}; known: {list(TASKS)}")
    for table, known in TABLE_KEYS.items():  # a misspelt key would be ignored: its setting silently lost
        entries = preset.get(table, {})
        if not isinstance(entries, dict):
            raise InputError(f"error: {path}: {table} must be a table ([{table}]), not {type(entries).__name__}")
        strays = sorted(set(entries) - set(known or preset["tasks"]))
        if strays:
            what = "tasks of this grid" if known is None else "keys"
            raise InputError(
                f"error: {path}: [{table}] has unknown key(s) {strays}; {what}: {sorted(known or preset['tasks'])}"
            )
    if "transfer" in preset:
        pairs = preset["transfer"].get("pairs")
        if not pairs or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise InputError(f"error: {path}: [transfer] needs pairs = [[source, target], ...]")
        strays = sorted({source for source, _ in pairs} - set(preset["tasks"]))
        if strays:
            raise InputError(f"error: {path}: transfer source task(s) {strays} are not in tasks {preset['tasks']}")
        unlabelled = sorted({task for pair in pairs for task in pair} - set(labelled_tasks()))
        if unlabelled:
            raise InputError(
                f"error: {path}: [transfer] pairs name {unlabelled}; transfer runs between the classification "
                f"tasks {labelled_tasks()}"
            )
    if "xlora" in preset:
        check_xlora_table(path, preset)
    if "tune" in preset:
        preset["tune"] = tuning.tune_settings(path, preset["tune"])
        if preset["tune"].seed in preset["seeds"]:
            raise InputError(
                f"error: {path}: [tune] seed {preset['tune'].seed} is one of the grid's seeds {preset['seeds']}: a "
                "tuning run would share its initialisation and data order with a final run (or be the same run); "
                "give [tune] a seed outside them (default 0)"
            )
    return GridPreset(path=path, **preset)


XLORA_KEYS = {"experts", "expert_tasks", "tasks", "options", "label"}


def check_xlora_table(path: Path, preset: dict) -> None:
    table = preset["xlora"]
    unknown = sorted(set(table) - XLORA_KEYS)
    if unknown:
        raise InputError(f"error: {path}: [xlora] has no key(s) {unknown} (known: {sorted(XLORA_KEYS)})")
    experts = table.get("experts")
    if not isinstance(experts, list) or not experts or any(v not in preset["variants"] for v in experts):
        raise InputError(
            f"error: {path}: [xlora] experts must list variants of the grid (LoRA ones), got {experts!r}; "
            f"variants: {list(preset['variants'])}"
        )
    for key in ("tasks", "expert_tasks"):
        strays = sorted(set(table.get(key, preset["tasks"])) - set(preset["tasks"]))
        if strays:
            raise InputError(f"error: {path}: [xlora] {key} {strays} are not tasks of the grid {preset['tasks']}")
    if not isinstance(table.get("options", {}), dict):
        raise InputError(f"error: {path}: [xlora] options must be a table of peft XLoraConfig fields")
    if table.get("label", "xlora") in preset["variants"]:
        raise InputError(f"error: {path}: [xlora] label {table.get('label', 'xlora')!r} is also a variant's name")


def xlora_cells(preset: GridPreset) -> list[tuple[str, str]]:
    """The (label, task) cells an [xlora] table adds to the grid."""
    table = preset.xlora
    return [(table.get("label", "xlora"), task) for task in table.get("tasks", preset.tasks)] if table else []


def flag_list(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else [f"--no-{key}"]
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def tiny_checkpoint_path(folder: Path, preset_name: str) -> Path:
    return folder / f"random-{preset_name}-checkpoint"


def tiny_checkpoint(folder: Path, preset_name: str) -> Path:
    """A randomly initialised GPT-2 of a test size, saved once per grid (seeded, so reproducible)."""

    from model import GPT2Config, GPT2LMHeadModel

    path = tiny_checkpoint_path(folder, preset_name)
    if not (path / "model.safetensors").is_file():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config.from_preset(preset_name)).save_pretrained(path)
    return path


@dataclass
class GridPlan:
    """What a preset plans today: its tuning runs (a [tune] preset), the final runs whose rate is known,
    the final runs still waiting for their cell's tuning, and each tuned cell's record (tuning.json)."""

    tuning: list[PlannedRun]
    runs: list[PlannedRun]
    waiting: int = 0
    cells: list[dict] = field(default_factory=list)


def plan(preset: GridPreset, out_dir: Path, inputs: list[str], dry_run: bool = False) -> list[PlannedRun]:
    """Every final run of the grid that can be named now (see `plan_grid`)."""
    return plan_grid(preset, out_dir, inputs).runs


def plan_grid(preset: GridPreset, out_dir: Path, inputs: list[str]) -> GridPlan:
    """Every run of the grid; `inputs`: the --data_dir / --tokenizer flags passed to each run. Planning
    writes nothing: a random-init checkpoint is made in a temporary folder (seeded, so its bytes, and
    so the runs' identities, are those of the grid's own copy, written once the plan is valid). With a
    [tune] table, a tuned cell's final runs are planned once its tuning runs have all finished (their
    identity holds the chosen rate): the choice is read from the tuning runs' folders."""
    model_spec = preset.model
    with tempfile.TemporaryDirectory(prefix="ablate-plan-") as scratch:
        return _plan_runs(preset, out_dir, inputs, model_spec, Path(scratch))


def fixes_lr(argv: list[str]) -> bool:
    """A run whose flags set --lr: an explicit rate, which the [tune] stage leaves as it is."""
    return any(word == "--lr" or word.startswith("--lr=") for word in argv)


def make_planner(preset: GridPreset, out_dir: Path, inputs: list[str], model: str, config_source: str | None):
    """`planned(task, label, flags, seed, stage) -> (PlannedRun, RunSpec)`: one run of the grid, its flags
    validated by the run's own parser (`config_source`: a stand-in checkpoint to read the config from)."""
    bases = {}

    def planned(task: str, variant: str, flags: list[str], seed: int, stage: str | None) -> tuple[PlannedRun, Any]:
        argv = run_argv(preset, task, model, variant, flags, seed, out_dir, inputs)
        try:
            spec, _ = entry.parse(entry.GENERIC, argv, inputs=False, checkpoint_source=config_source)
        except SystemExit:  # argparse printed what is wrong with the flags
            raise InputError(
                f"error: preset task {task!r}, variant {variant!r}: its flags are rejected "
                f"by python -m {MODULE} (message above)"
            ) from None
        # The plan is the spec; its command line is rendered from it only to launch it.
        base = bases.setdefault(config_source or model, read_checkpoint_config(config_source or model))
        command = render_argv(spec, base)
        return PlannedRun(task, variant, seed, command, MODULE, run_folder(spec, migrate=False), stage=stage), spec

    return planned


def _plan_runs(preset: GridPreset, out_dir: Path, inputs: list[str], model_spec: dict, scratch: Path) -> GridPlan:
    config_source = None
    if "random_init" in model_spec:
        model = str(tiny_checkpoint_path(out_dir, model_spec["random_init"]))
        if not (Path(model) / "model.safetensors").is_file():
            config_source = str(tiny_checkpoint(scratch, model_spec["random_init"]))
    else:
        model = model_spec.get("model", "gpt2")
    planned = make_planner(preset, out_dir, inputs, model, config_source)

    tune: tuning.TuneSettings | None = preset.tune
    result = GridPlan([], [])
    for task in preset.tasks:
        for variant, variant_flags in preset.variants.items():
            final_flags = [*variant_flags, *(["--stage", "final"] if tune else [])]
            tuned = tune is not None and not fixes_lr(
                run_argv(preset, task, model, variant, variant_flags, 0, out_dir, [])
            )
            if tuned:
                choice = _plan_tuning(preset, task, variant, variant_flags, tune, planned, result)
                if choice is None:
                    result.waiting += len(preset.seeds)
                    continue
                final_flags += ["--lr", repr(choice.lr), "--lr_chosen_by", *choice.chosen_by]
            for seed in preset.seeds:
                result.runs.append(planned(task, variant, final_flags, seed, "final" if tune else None)[0])
    return result


def _plan_tuning(preset: GridPreset, task: str, variant: str, base_flags: list[str], tune, planned, result: GridPlan):
    """A tuned cell's tuning runs (added to `result`, with the cell's record) and its choice, None while
    a tuning run is not finished (or every one diverged). `base_flags`: the cell's own flags."""
    flags = [*base_flags, *tune.budget_flags(), "--stage", "tune", "--no-predict_test"]
    _, probe = planned(task, variant, flags, tune.seed, "tune")  # its config (the rate does not change it)
    prior = tuning.config_prior(probe.config)
    trials = []
    for lr in tuning.candidates(tune, prior):  # (the seed is outside the grid's: never a final run, load_preset)
        run, _ = planned(task, variant, [*flags, "--lr", repr(lr)], tune.seed, "tune")
        result.tuning.append(run)
        trials.append(tuning.read_trial(lr, run.run_dir))
    choice = tuning.choose(trials)
    result.cells.append(tuning.cell_record(variant, task, prior, trials, choice))
    return choice


def run_argv(
    preset: GridPreset, task: str, model: str, label: str, flags: list[str], seed: int, out_dir: Path, inputs: list[str]
) -> list[str]:
    """The command line (after `python -m train`) of one run of the grid."""
    return [
        *("--task", task, "--model", model),
        *flag_list(preset.common),
        *preset.task_flags.get(task, []),
        *flags,
        *("--seed", str(seed), "--out_dir", str(out_dir), "--wandb_group", preset.name, "--label", label),
        *inputs,
    ]


def plan_xlora(preset: GridPreset, runs: list[PlannedRun], inputs: list[str], out_dir: Path) -> GridPlan:
    """The X-LoRA runs of a preset with an [xlora] table, planned once their expert runs have finished
    (their identity holds the experts' digests): per task and seed, the experts are that seed's runs of
    the `experts` variants on the `expert_tasks`, named `<variant>-<task>`. With a [tune] table its rate
    is tuned like every method's: the tuning runs mix the first seed's experts (the tuning seed has none
    of its own), and the final runs wait for the choice."""
    table = preset.xlora
    label = table.get("label", "xlora")
    model_spec = preset.model
    model = str(tiny_checkpoint_path(out_dir, model_spec["random_init"])) if "random_init" in model_spec else None
    planned = make_planner(preset, out_dir, inputs, model or model_spec.get("model", "gpt2"), None)
    by_point = {(r.variant, r.task, r.seed): r.run_dir for r in runs}

    def mixture(seed: int) -> list[str]:
        experts = {
            f"{variant}-{expert_task}": str(by_point[(variant, expert_task, seed)])
            for variant in table["experts"]
            for expert_task in table.get("expert_tasks", preset.tasks)
        }
        return [
            "--peft_method",
            "xlora",
            "--peft_config",
            json.dumps({**table.get("options", {}), "adapters": experts}),
        ]

    tune: tuning.TuneSettings | None = preset.tune
    result = GridPlan([], [])
    for _, task in xlora_cells(preset):
        final_flags = ["--stage", "final"] if tune is not None else []
        if tune is not None:
            choice = _plan_tuning(preset, task, label, mixture(preset.seeds[0]), tune, planned, result)
            if choice is None:
                result.waiting += len(preset.seeds)
                continue
            final_flags += ["--lr", repr(choice.lr), "--lr_chosen_by", *choice.chosen_by]
        for seed in preset.seeds:
            run, _ = planned(task, label, [*mixture(seed), *final_flags], seed, "final" if tune is not None else None)
            result.runs.append(run)
    return result


def left(stage: list[PlannedRun]) -> list[PlannedRun]:
    """The runs of a stage still to run (not finished, not held by another process)."""
    return [r for r in stage if status(r) not in ("done", "running")]


def xlora_stage(preset: GridPreset, grid: GridPlan, inputs: list[str], out_dir: Path) -> tuple[str, list]:
    """What of the X-LoRA stage to submit next (a cluster launcher): its tuning runs while any is left,
    then its runs at the chosen rate (their variant name recorded for the report)."""
    xplan = plan_xlora(preset, grid.runs, inputs, out_dir)
    pending = left(xplan.tuning)
    if pending or any(status(r) == "running" for r in xplan.tuning):
        return "X-LoRA tuning runs", pending
    if xplan.cells:
        tuning.write_record(out_dir, preset.tune, grid.cells + xplan.cells)
    record_variant_names(out_dir, xplan.runs)
    return "X-LoRA runs", left(xplan.runs)


def xlora_tuning_count(preset: GridPreset) -> int:
    """X-LoRA's tuning runs (a [tune] preset): one per candidate rate and task."""
    tune = preset.tune
    candidates = 0 if tune is None else tune.points if isinstance(tune.lr, str) else len(tune.lr)
    return len(xlora_cells(preset)) * candidates


def xlora_count(preset: GridPreset) -> int:
    """Every X-LoRA run the grid will train: its tuning runs and one per task and seed."""
    return xlora_tuning_count(preset) + len(xlora_cells(preset)) * len(preset.seeds)


def plan_transfer(
    preset: GridPreset, sources: list[PlannedRun], inputs: list[str]
) -> tuple[list[PlannedRun], list[dict]]:
    """The second stage of a preset with a [transfer] section, planned once the source runs exist:
    per finished source run and pair, a transfer run and its from-scratch control (train/cli/transfer.py),
    and one CKA analysis of each source model (experiments/cka.py). Returns (jobs, manifest rows)."""
    from train.cli import transfer

    spec = preset.transfer
    shared = [
        "--target_fraction",
        str(spec.get("target_fraction", 0.01)),
        "--epochs",
        str(spec.get("epochs", 1)),
        *spec.get("flags", []),
    ]
    cka = preset.cka
    jobs, manifest, analysed = [], [], set()
    for source_task, target in spec["pairs"]:
        for source in (r for r in sources if r.task == source_task):
            argv = [
                "--source_run",
                str(source.run_dir),
                "--target",
                target,
                *shared,
                *spec.get("target_flags", {}).get(target, []),
                *inputs,
            ]
            try:
                transfer_dir = transfer.planned_run_dir(argv)
                scratch_dir = transfer.planned_run_dir([*argv, "--from_scratch"])
            except SystemExit:
                raise InputError(
                    f"error: transfer {source_task} -> {target} from {source.run_dir.name}: its flags are rejected by "
                    f"python -m train.transfer (message above)"
                ) from None
            label = f"{source_task}-to-{target}"
            jobs.append(PlannedRun(label, source.variant, source.seed, argv, "train.transfer", transfer_dir))
            jobs.append(
                PlannedRun(
                    f"{target} scratch",
                    source.variant,
                    source.seed,
                    [*argv, "--from_scratch"],
                    "train.transfer",
                    scratch_dir,
                )
            )
            cka_dir = source.run_dir / "cka"
            if source.run_dir not in analysed:
                analysed.add(source.run_dir)
                layers = ["--layers", *map(str, cka["layers"])] if cka.get("layers") else []
                cka_argv = [str(source.run_dir), "--task", source_task, "--n", str(cka.get("n", 512)), *layers]
                cka_argv += ["--out", str(cka_dir), *inputs]
                jobs.append(
                    PlannedRun(
                        f"cka {source_task}",
                        source.variant,
                        source.seed,
                        cka_argv,
                        "experiments.cka",
                        cka_dir,
                        cka_dir / "cka.json",
                    )
                )
            manifest.append(
                {
                    "variant": source.variant,
                    "seed": source.seed,
                    "source_task": source_task,
                    "target": target,
                    "source_run": str(source.run_dir),
                    "transfer_run": str(transfer_dir),
                    "scratch_run": str(scratch_dir),
                    "cka": str(cka_dir / "cka.json"),
                }
            )
    return jobs, manifest


def status(run: PlannedRun) -> str:
    """done (finished; a tuning run: or diverged), running (another process holds its folder: a job of an
    earlier, killed ablate), resume (interrupted, or died before its first checkpoint), or new."""
    if run.done_file is not None:
        return "done" if run.done_file.is_file() else "new"
    state = folder_state(run.run_dir)
    if state == "finished":
        return "done"
    if run.stage == "tune" and (run.run_dir / "diverged.json").is_file() and not lock_holder(run.run_dir):
        return "done"  # a candidate rate that diverged is a finished trial (it scores below every other)
    if lock_holder(run.run_dir):
        return "running"
    return {"interrupted": "resume", "dead": "resume"}.get(state, "new")


def run_lr(run: PlannedRun) -> str:
    """The --lr of a planned run's command line (its rate as the run name shows it)."""
    argv = run.argv
    return next((f"{float(argv[i + 1]):g}" for i, word in enumerate(argv[:-1]) if word == "--lr"), "default")


def without_rate(grid: GridPlan, tasks: list[str], variants: list[str]) -> list[str]:
    """The `variant/task` cells among these whose tuning has chosen no rate yet (their final runs are not planned)."""
    return [
        f"{c['variant']}/{c['task']} ({c['status']})"
        for c in grid.cells
        if c["status"] != "chosen" and c["task"] in tasks and c["variant"] in variants
    ]


def experts_ready(preset: GridPreset, grid: GridPlan) -> tuple[bool, str]:
    """Whether the X-LoRA stage can be planned (every expert cell has its rate and its runs finished), and why not."""
    table = preset.xlora or {}
    experts, expert_tasks = table.get("experts", []), table.get("expert_tasks", preset.tasks)
    missing = without_rate(grid, expert_tasks, experts)
    if missing:
        return False, f"no rate chosen yet for {', '.join(missing)}"
    left = [
        r.run_dir.name for r in grid.runs if r.variant in experts and r.task in expert_tasks and status(r) != "done"
    ]
    return not left, f"{len(left)} expert run(s) not finished"


def planned_count(preset: GridPreset, grid: GridPlan) -> int:
    """Every run the grid will train: tuning runs, final runs (named or waiting for their tuning), X-LoRA runs."""
    return len(grid.tuning) + len(grid.runs) + grid.waiting + xlora_count(preset)


def tuning_summary(cells: list[dict]) -> str:
    """One line: how many tuned cells chose a rate, and how many at an end of their range."""
    chosen = [c for c in cells if c["status"] == "chosen"]
    edges = [f"{c['variant']}/{c['task']} ({c['edge']})" for c in chosen if c["edge"]]
    line = f"{len(chosen)} of {len(cells)} cells chose a rate"
    if edges:
        line += f"; best at an end of the range tried (widen it): {', '.join(edges[:8])}"
        line += f" and {len(edges) - 8} more" if len(edges) > 8 else ""
    return line


def transfer_stage(preset: GridPreset, runs: list[PlannedRun], inputs: list[str], out_dir: Path) -> tuple[list, list]:
    """A transfer preset's second stage, planned from its finished source runs and recorded in
    transfer.json: (every job of the stage, those not done yet)."""
    stage, manifest = plan_transfer(preset, runs, inputs)
    write_transfer_manifest(out_dir, preset, stage, manifest)
    return stage, [r for r in stage if status(r) != "done"]


def _check_inputs(argv: list[str]) -> None:
    """A run's data (fetched when missing and allowed) and tokenizer, once per task before any job starts."""
    from train.cli.parse import check_data

    parser = ArgumentParser(prog="ablate")
    parser.add_argument("--data_dir")
    parser.add_argument("--tokenizer")
    parser.add_argument("--task")
    known, _ = parser.parse_known_args(argv)
    check_data(parser, [known.task], known.data_dir, known.tokenizer)


def write_transfer_manifest(out_dir: Path, preset: GridPreset, stage: list[PlannedRun], manifest: list[dict]) -> None:
    """transfer.json (which runs belong together, for experiments/report.py) and the variant names of the
    stage's runs in variants.json (config hash -> the preset's variant name)."""
    (out_dir / "transfer.json").write_text(json.dumps({"settings": preset.transfer, "runs": manifest}, indent=2) + "\n")
    record_variant_names(out_dir, stage)


def record_variant_names(out_dir: Path, stage: list[PlannedRun]) -> None:
    """Add a stage's runs to variants.json (config hash -> the preset's variant name, for the report)."""
    names_file = out_dir / "variants.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else {}
    for run in stage:
        if run.done_file is None:
            names[run.run_dir.name.rsplit("-", 1)[1]] = run.variant
    names_file.write_text(json.dumps(names, indent=2) + "\n")
