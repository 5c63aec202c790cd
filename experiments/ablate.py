"""Run an ablation grid from a preset: tasks x variants x seeds, every run in its own folder.

    python -m experiments.ablate experiments/presets/smoke.toml --out_dir ablations/smoke --jobs 2
    python -m experiments.report ablations/smoke

Each run is `python -m train --task <task> <common flags> <task flags> <variant flags> --seed S
--out_dir <grid folder>`; all rows land in `<grid folder>/runs.tsv` and share one wandb group (the
grid's name). Tasks are the task registry's; run folders carry a hash of every result-changing
setting, so variants that differ in any flag (e.g. `--lora_targets qkv`, `--batch_size 16`) are
distinct runs. Re-running the same command skips runs whose metrics.json exists and resumes runs
that were killed (`--resume` from their last checkpoint), so a killed grid just continues.

Before any run starts, every run's flags are validated and the task data and tokenizer are checked
(`--data_dir` / `--tokenizer`, else $GPT2_DATA_DIR / $GPT2_TOKENIZER; missing data are fetched into
the cache folder when no --data_dir was given). SIGINT / SIGTERM are forwarded to the running
jobs, which save a checkpoint and stop; the script then says what is done and left and exits
130 / 143. `--dry_run` lists the runs and writes nothing.

Beyond this machine (experiments/launchers.py): `--launcher slurm` submits the pending runs as one SLURM
job array through submitit (preemption-safe: checkpoint, requeue, --resume); `--wandb_sweep OUT.yaml`
writes a wandb grid sweep whose agents run one point each through `--task T --variant V --seed S`.
A preset with a [transfer] table adds a second stage once its runs are done (train/transfer.py).
A preset with a [tune] table trains each method at its own learning rate: one dev-only run per candidate
rate and (method, task) first, then the seeds at the best dev rate (experiments/tuning.py; docs/experiments.md).
A preset with an [xlora] table adds X-LoRA runs once their experts are done: per task and seed, a
`--peft_method xlora` run mixing that seed's runs of the `experts` variants on the `expert_tasks`
(modules/xlora.py); they are rows of the grid like any variant (label `xlora`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments import launchers, tuning
from experiments.inputs import InputError, reported
from model.loading import read_checkpoint_config
from task_data.common import DataError, ensure_data
from train import console, entry
from train.cli import ArgumentParser, render_argv
from train.commands import exit_status
from train.index import update_index
from train.lifecycle import EXIT_DIVERGED, EXIT_STATUS
from train.run import legacy_folders, lock_holder, migrate_legacy, run_folder
from train.runs import folder_state
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


def load_preset(path: Path) -> dict:
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
    return preset


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


def xlora_cells(preset: dict) -> list[tuple[str, str]]:
    """The (label, task) cells an [xlora] table adds to the grid."""
    table = preset.get("xlora")
    return [(table.get("label", "xlora"), task) for task in table.get("tasks", preset["tasks"])] if table else []


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
    import torch

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


def plan(preset: dict, out_dir: Path, inputs: list[str], dry_run: bool = False) -> list[PlannedRun]:
    """Every final run of the grid that can be named now (see `plan_grid`)."""
    return plan_grid(preset, out_dir, inputs).runs


def plan_grid(preset: dict, out_dir: Path, inputs: list[str]) -> GridPlan:
    """Every run of the grid; `inputs`: the --data_dir / --tokenizer flags passed to each run. Planning
    writes nothing: a random-init checkpoint is made in a temporary folder (seeded, so its bytes, and
    so the runs' identities, are those of the grid's own copy, written once the plan is valid). With a
    [tune] table, a tuned cell's final runs are planned once its tuning runs have all finished (their
    identity holds the chosen rate): the choice is read from the tuning runs' folders."""
    model_spec = preset.get("model", {})
    with tempfile.TemporaryDirectory(prefix="ablate-plan-") as scratch:
        return _plan_runs(preset, out_dir, inputs, model_spec, Path(scratch))


def fixes_lr(argv: list[str]) -> bool:
    """A run whose flags set --lr: an explicit rate, which the [tune] stage leaves as it is."""
    return any(word == "--lr" or word.startswith("--lr=") for word in argv)


def make_planner(preset: dict, out_dir: Path, inputs: list[str], model: str, config_source: str | None):
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


def _plan_runs(preset: dict, out_dir: Path, inputs: list[str], model_spec: dict, scratch: Path) -> GridPlan:
    config_source = None
    if "random_init" in model_spec:
        model = str(tiny_checkpoint_path(out_dir, model_spec["random_init"]))
        if not (Path(model) / "model.safetensors").is_file():
            config_source = str(tiny_checkpoint(scratch, model_spec["random_init"]))
    else:
        model = model_spec.get("model", "gpt2")
    planned = make_planner(preset, out_dir, inputs, model, config_source)

    tune: tuning.TuneSettings | None = preset.get("tune")
    result = GridPlan([], [])
    for task in preset["tasks"]:
        for variant, variant_flags in preset["variants"].items():
            final_flags = [*variant_flags, *(["--stage", "final"] if tune else [])]
            tuned = tune is not None and not fixes_lr(
                run_argv(preset, task, model, variant, variant_flags, 0, out_dir, [])
            )
            if tuned:
                choice = _plan_tuning(preset, task, variant, variant_flags, tune, planned, result)
                if choice is None:
                    result.waiting += len(preset["seeds"])
                    continue
                final_flags += ["--lr", repr(choice.lr), "--lr_chosen_by", *choice.chosen_by]
            for seed in preset["seeds"]:
                result.runs.append(planned(task, variant, final_flags, seed, "final" if tune else None)[0])
    return result


def _plan_tuning(preset: dict, task: str, variant: str, base_flags: list[str], tune, planned, result: GridPlan):
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
    preset: dict, task: str, model: str, label: str, flags: list[str], seed: int, out_dir: Path, inputs: list[str]
) -> list[str]:
    """The command line (after `python -m train`) of one run of the grid."""
    return [
        *("--task", task, "--model", model),
        *flag_list(preset.get("common", {})),
        *preset.get("task_flags", {}).get(task, []),
        *flags,
        *("--seed", str(seed), "--out_dir", str(out_dir), "--wandb_group", preset["name"], "--label", label),
        *inputs,
    ]


def plan_xlora(preset: dict, runs: list[PlannedRun], inputs: list[str], out_dir: Path) -> GridPlan:
    """The X-LoRA runs of a preset with an [xlora] table, planned once their expert runs have finished
    (their identity holds the experts' digests): per task and seed, the experts are that seed's runs of
    the `experts` variants on the `expert_tasks`, named `<variant>-<task>`. With a [tune] table its rate
    is tuned like every method's: the tuning runs mix the first seed's experts (the tuning seed has none
    of its own), and the final runs wait for the choice."""
    table = preset["xlora"]
    label = table.get("label", "xlora")
    model_spec = preset.get("model", {})
    model = str(tiny_checkpoint_path(out_dir, model_spec["random_init"])) if "random_init" in model_spec else None
    planned = make_planner(preset, out_dir, inputs, model or model_spec.get("model", "gpt2"), None)
    by_point = {(r.variant, r.task, r.seed): r.run_dir for r in runs}

    def mixture(seed: int) -> list[str]:
        experts = {
            f"{variant}-{expert_task}": str(by_point[(variant, expert_task, seed)])
            for variant in table["experts"]
            for expert_task in table.get("expert_tasks", preset["tasks"])
        }
        return [
            "--peft_method",
            "xlora",
            "--peft_config",
            json.dumps({**table.get("options", {}), "adapters": experts}),
        ]

    tune: tuning.TuneSettings | None = preset.get("tune")
    result = GridPlan([], [])
    for _, task in xlora_cells(preset):
        final_flags = ["--stage", "final"] if tune is not None else []
        if tune is not None:
            choice = _plan_tuning(preset, task, label, mixture(preset["seeds"][0]), tune, planned, result)
            if choice is None:
                result.waiting += len(preset["seeds"])
                continue
            final_flags += ["--lr", repr(choice.lr), "--lr_chosen_by", *choice.chosen_by]
        for seed in preset["seeds"]:
            run, _ = planned(task, label, [*mixture(seed), *final_flags], seed, "final" if tune is not None else None)
            result.runs.append(run)
    return result


def left(stage: list[PlannedRun]) -> list[PlannedRun]:
    """The runs of a stage still to run (not finished, not held by another process)."""
    return [r for r in stage if status(r) not in ("done", "running")]


def xlora_stage(preset: dict, grid: GridPlan, inputs: list[str], out_dir: Path) -> tuple[str, list]:
    """What of the X-LoRA stage to submit next (a cluster launcher): its tuning runs while any is left,
    then its runs at the chosen rate (their variant name recorded for the report)."""
    xplan = plan_xlora(preset, grid.runs, inputs, out_dir)
    pending = left(xplan.tuning)
    if pending or any(status(r) == "running" for r in xplan.tuning):
        return "X-LoRA tuning runs", pending
    if xplan.cells:
        tuning.write_record(out_dir, preset["tune"], grid.cells + xplan.cells)
    record_variant_names(out_dir, xplan.runs)
    return "X-LoRA runs", left(xplan.runs)


def xlora_tuning_count(preset: dict) -> int:
    """X-LoRA's tuning runs (a [tune] preset): one per candidate rate and task."""
    tune = preset.get("tune")
    candidates = 0 if tune is None else tune.points if isinstance(tune.lr, str) else len(tune.lr)
    return len(xlora_cells(preset)) * candidates


def xlora_count(preset: dict) -> int:
    """Every X-LoRA run the grid will train: its tuning runs and one per task and seed."""
    return xlora_tuning_count(preset) + len(xlora_cells(preset)) * len(preset["seeds"])


def plan_transfer(preset: dict, sources: list[PlannedRun], inputs: list[str]) -> tuple[list[PlannedRun], list[dict]]:
    """The second stage of a preset with a [transfer] section, planned once the source runs exist:
    per finished source run and pair, a transfer run and its from-scratch control (train/transfer.py),
    and one CKA analysis of each source model (experiments/cka.py). Returns (jobs, manifest rows)."""
    from train import transfer

    spec = preset["transfer"]
    shared = [
        "--target_fraction",
        str(spec.get("target_fraction", 0.01)),
        "--epochs",
        str(spec.get("epochs", 1)),
        *spec.get("flags", []),
    ]
    cka = preset.get("cka", {})
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


def parse_gpus(parser: argparse.ArgumentParser, text: str) -> list[int]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or not all(w.isdigit() for w in words):
        parser.error(f"--gpus {text!r}: give GPU indices separated by commas, e.g. 0,1,2,3")
    gpus = [int(w) for w in words]
    if len(set(gpus)) != len(gpus):
        parser.error(f"--gpus {text!r}: a GPU is listed twice")
    if not torch.cuda.is_available():
        parser.error("--gpus: CUDA is not available on this machine")
    visible = torch.cuda.device_count()
    if max(gpus) >= visible:
        parser.error(f"--gpus {text!r}: this machine has {visible} CUDA device(s) (0..{visible - 1})")
    return gpus


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
        with open(log_dir / f"{run.name}.log", "a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} ablate (in process {os.getpid()}): {run.name}\n")
            log.flush()
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), torch_threads(env):
                code = call_main(run.module, argv)
        if code in EXIT_STATUS.values():  # the run was interrupted: the grid stops too
            self.stop_signal = self.stop_signal or next(s for s, c in EXIT_STATUS.items() if c == code)
        return run, code, time.perf_counter() - start


def call_main(module: str, argv: list[str]) -> int:
    """`python -m module argv`'s exit status, called in this process."""
    name = "train.entry" if module == "train" else module
    try:
        return int(importlib.import_module(name).main(argv) or 0)
    except SystemExit as stop:  # a parser's error (2), --help (0)
        return stop.code if isinstance(stop.code, int) else 1


@contextlib.contextmanager
def torch_threads(env: dict):
    """The job's thread count (what OMP_NUM_THREADS gives a process), restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@reported
@console.command("python -m experiments.ablate")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--out_dir", type=Path, default=None, help="grid folder (default: ablations/<name>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1, or one per --gpus entry)")
    parser.add_argument(
        "--gpus",
        default=None,
        help="comma-separated GPU indices, e.g. 0,1,2,3: one run per GPU at a time (CUDA_VISIBLE_DEVICES), the "
        "rest queued (default: off)",
    )
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / jobs)")
    parser.add_argument("--dry_run", action="store_true", help="list the runs and their status only; writes nothing")
    parser.add_argument("--data_dir", default=None, help="task data of every run (default: $GPT2_DATA_DIR or cache)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder of every run (default: $GPT2_TOKENIZER)")
    cluster = parser.add_argument_group("beyond this machine (experiments/launchers.py)")
    cluster.add_argument(
        "--launcher",
        choices=launchers.LAUNCHERS,
        default="local",
        help="local: run here, each run its own process; inprocess: run here, one run at a time inside this "
        "process (debugging, tests: a breakpoint in the training code stops there); slurm: submit the pending "
        "runs as one SLURM job array through submitit; submitit_local: the slurm path with submitit's local "
        "executor (default: %(default)s)",
    )
    for name in launchers.SlurmSettings.names():
        default = getattr(launchers.SlurmSettings(), name)
        kind = {"extra": None, "mem": str, "partition": str, "account": str, "qos": str}.get(name, int)
        extra = {"nargs": "*", "metavar": "KEY=VALUE"} if name == "extra" else {"type": kind}
        cluster.add_argument(
            f"--slurm_{name}", default=None, help=f"(default: the preset's [slurm] {name}, else {default})", **extra
        )
    cluster.add_argument("--wait", action="store_true", help="slurm: wait for the submitted jobs and report them")
    cluster.add_argument(
        "--wandb_sweep", type=Path, default=None, metavar="OUT.yaml", help="write a wandb sweep of the grid and stop"
    )
    point = parser.add_argument_group("one point of the grid (what a wandb sweep agent runs)")
    point.add_argument("--task", default=None, help="run only this task's point (with --variant and --seed)")
    point.add_argument("--variant", default=None, help="run only this variant's point (a name in the preset)")
    point.add_argument("--seed", type=int, default=None, help="run only this seed's point")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    gpus = parse_gpus(parser, args.gpus) if args.gpus is not None else None
    if gpus:
        args.jobs = len(gpus)
    preset = load_preset(args.preset)
    out_dir = (args.out_dir or REPO / "ablations" / preset["name"]).absolute()
    inputs = [
        word for name in ("data_dir", "tokenizer") if (value := getattr(args, name)) for word in (f"--{name}", value)
    ]
    settings = None
    if args.launcher == "inprocess" and (args.jobs > 1 or gpus):
        parser.error("--launcher inprocess runs one job at a time in this process: drop --jobs / --gpus")
    if args.launcher not in ("local", "inprocess") or args.dry_run:
        try:
            overrides = {name: getattr(args, f"slurm_{name}") for name in launchers.SlurmSettings.names()}
            settings = launchers.slurm_settings(preset, overrides)
        except (TypeError, ValueError) as error:
            parser.error(str(error))
    if args.launcher == "slurm" and not args.dry_run and shutil.which("sbatch") is None:
        parser.error("--launcher slurm needs SLURM's sbatch on this machine (run it on the cluster's login node)")
    if args.wandb_sweep is not None:
        return write_sweep(preset, args, out_dir, inputs)
    selection = [args.task, args.variant, args.seed]
    if any(value is not None for value in selection):
        if None in selection:
            parser.error("one grid point needs all of --task, --variant and --seed")
        return run_point(preset, out_dir, inputs, args.task, args.variant, args.seed)
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"--out_dir {out_dir} is a file, not a folder")
    legacy = legacy_folders(out_dir) if out_dir.is_dir() else []
    if legacy and not args.dry_run:
        migrate_legacy(out_dir)  # once, before planning, so the plan finds them under their new names
    elif legacy:
        print(
            f"note: {len(legacy)} run folder(s) here were written by an older version; a real run first renames "
            "them to their new names (until then they are listed as new below)"
        )
    grid = plan_grid(preset, out_dir, inputs)
    runs, tune = grid.runs, preset.get("tune")
    folders = [r.run_dir for r in grid.tuning + runs]
    if len(set(folders)) != len(folders):
        dupes = sorted({f.name for f in folders if folders.count(f) > 1})
        raise InputError(f"error: preset variants that produce the same run: {dupes}")
    held = [r for r in grid.tuning + runs if status(r) == "running"]
    tune_todo, todo = left(grid.tuning), left(runs)
    if tune is not None:
        tune_done = len(grid.tuning) - len(tune_todo) - sum(r.stage == "tune" for r in held)
        final_done = len(runs) - len(todo) - sum(r.stage != "tune" for r in held)
        print(
            f"grid {preset['name']}: {len(grid.tuning)} tuning runs ({tune_done} already done, {len(tune_todo)} to "
            f"run), then {len(runs) + grid.waiting} final runs ({final_done} already done, {len(todo)} to run, "
            f"{grid.waiting} waiting for their cell's tuning) -> {out_dir}"
        )
    else:
        print(
            f"grid {preset['name']}: {len(runs)} runs, {len(runs) - len(todo) - len(held)} already done, {len(todo)} "
            f"to run -> {out_dir}"
        )
    for run in held:
        print(
            f"  skipped {run.run_dir.name}: process {lock_holder(run.run_dir)} is writing it (a job of an earlier "
            "ablate); re-run this command once it has ended"
        )
    if args.dry_run:
        return dry_run(args, preset, grid, todo, inputs, out_dir, settings)
    # Every run's data and tokenizer, once, before any run starts (fetching missing data when allowed).
    # (The flags were validated while planning; a random-init checkpoint is written only once all is well.)
    model_spec = preset.get("model", {})
    for task in dict.fromkeys(r.task for r in grid.tuning + runs):
        _check_inputs(next(r.argv for r in grid.tuning + runs if r.task == task))
    targets = {target for _, target in preset.get("transfer", {}).get("pairs", [])} - set(preset["tasks"])
    try:
        ensure_data(sorted({name for t in targets for name in TASKS[t].data_files()}), args.data_dir)
    except DataError as error:
        raise InputError(f"error: transfer target data: {error}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    update_index(out_dir)  # every finished run has its runs.tsv row (a run killed after metrics.json had none)
    if "random_init" in model_spec:
        tiny_checkpoint(out_dir, model_spec["random_init"])
    # config hash (the last part of a run folder's name) -> the preset's variant name, for reports
    names = {r.run_dir.name.rsplit("-", 1)[1]: r.variant for r in runs}
    (out_dir / "variants.json").write_text(json.dumps(names, indent=2) + "\n")
    (out_dir / "grid.json").write_text(
        json.dumps(
            {
                "name": preset["name"],
                "preset": str(args.preset),
                "model": model_spec,
                "seeds": preset["seeds"],
                "planned_runs": planned_count(preset, grid),
                "cells": [[variant, task] for variant in preset["variants"] for task in preset["tasks"]]
                + [list(cell) for cell in xlora_cells(preset)],
                "random_init": "random_init" in model_spec,
                "transfer": "transfer" in preset,
                "tune": tune.to_dict() if tune is not None else None,
                "tuning_runs": len(grid.tuning) + xlora_tuning_count(preset),  # (X-LoRA's final runs are cells)
            },
            indent=2,
        )
        + "\n"
    )
    if tune is not None:
        tuning.write_record(out_dir, tune, grid.cells)
    if args.launcher not in ("local", "inprocess"):
        return launch_cluster(args, preset, grid, todo, out_dir, inputs, settings)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    start = time.perf_counter()
    jobs = InProcessJobs() if args.launcher == "inprocess" else Jobs(gpus)
    previous = {s: signal.signal(s, jobs.forward) for s in (signal.SIGINT, signal.SIGTERM)}
    outcome: dict[str, list] = {"failed": [], "interrupted": [], "not_started": [], "elsewhere": []}
    done_before, total, attempted, unchosen = 0, 0, [], []
    try:

        def run_stage(stage: list, stage_todo: list, what: str | None) -> None:
            """Run a stage's jobs that are left (saying what it holds first, unless `what` is None), counted
            with the grid's runs."""
            nonlocal outcome, done_before, total, attempted
            if what is not None:
                print(
                    f"grid {preset['name']}, {what}, {len(stage) - len(stage_todo)} already done, {len(stage_todo)} "
                    f"to run",
                    flush=True,
                )
            more = run_jobs(jobs, stage_todo, args.jobs, threads, log_dir)
            outcome = {key: outcome[key] + more[key] for key in outcome}
            done_before += len(stage) - len(stage_todo)
            total += len(stage)
            attempted = attempted + stage_todo

        if tune is not None:
            cells = len(grid.cells)
            run_stage(grid.tuning, tune_todo, f"tuning stage: {len(grid.tuning)} runs over {cells} cells")
            if jobs.stop_signal is None:  # the choices, now that the tuning runs have finished
                grid = plan_grid(preset, out_dir, inputs)
                tuning.write_record(out_dir, tune, grid.cells)
                runs = grid.runs
                record_variant_names(out_dir, runs)
                todo = left(runs)
                unchosen = [c for c in grid.cells if c["status"] != "chosen"]
                for cell in unchosen:
                    print(f"  {cell['variant']} on {cell['task']}: no rate chosen ({cell['status']}); no final runs")
                print(f"grid {preset['name']}, tuning stage done: {tuning_summary(grid.cells)}", flush=True)
        if jobs.stop_signal is None:
            run_stage(runs, todo, "final runs at the chosen rates" if tune is not None else None)
        sources_unplanned = without_rate(grid, preset["tasks"], list(preset["variants"]))
        if "transfer" in preset and jobs.stop_signal is None and sources_unplanned:
            print(f"the transfer stage needs every source run; no rate was chosen for {sources_unplanned}", flush=True)
        elif "transfer" in preset and jobs.stop_signal is None and outcome["elsewhere"]:
            print(
                f"the transfer stage waits: {len(outcome['elsewhere'])} source run(s) are held by another process; "
                "re-run when they have finished",
                flush=True,
            )
        elif "transfer" in preset and jobs.stop_signal is None and not outcome["failed"]:
            stage, stage_todo = transfer_stage(preset, runs, inputs, out_dir)
            run_stage(
                stage,
                stage_todo,
                f"transfer stage: {len(stage)} jobs (transfer runs, from-scratch controls, CKA of each source model)",
            )
        elif "transfer" in preset and outcome["failed"]:
            print("the transfer stage needs every source run: fix the failed runs and re-run", flush=True)
        xlora_ready, why = experts_ready(preset, grid)
        if "xlora" in preset and jobs.stop_signal is None and xlora_ready:
            xplan = plan_xlora(preset, runs, inputs, out_dir)
            if xplan.tuning:  # X-LoRA's own rate, tuned like every method's
                run_stage(xplan.tuning, left(xplan.tuning), f"X-LoRA tuning stage: {len(xplan.tuning)} runs")
                if jobs.stop_signal is None:
                    xplan = plan_xlora(preset, runs, inputs, out_dir)
                    tuning.write_record(out_dir, tune, grid.cells + xplan.cells)
                    unchosen += [c for c in xplan.cells if c["status"] != "chosen"]
            if jobs.stop_signal is None:
                record_variant_names(out_dir, xplan.runs)
                run_stage(xplan.runs, left(xplan.runs), f"X-LoRA stage: {len(xplan.runs)} runs")
        elif "xlora" in preset and jobs.stop_signal is None:
            print(
                f"the X-LoRA stage needs every expert run finished ({why}): fix or finish them and re-run", flush=True
            )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        update_index(out_dir)
    failed, interrupted, not_started = outcome["failed"], outcome["interrupted"], outcome["not_started"]
    seconds = time.perf_counter() - start
    if jobs.stop_signal is not None:
        finished = len(attempted) - len(failed) - len(interrupted) - len(not_started)
        counts = f"{done_before + finished} of {total} runs done"
        if tune is not None:  # count against the whole plan: later stages are planned as their inputs finish
            fresh = plan_grid(preset, out_dir, inputs)
            done = sum(status(r) == "done" for r in fresh.tuning + fresh.runs)
            counts = f"{done} of {planned_count(preset, fresh)} planned runs done (tuning runs included)"
            counts += f", {fresh.waiting} final runs wait for their tuning" if fresh.waiting else ""
        print(
            f"grid {preset['name']} interrupted by {signal.Signals(jobs.stop_signal).name} after {seconds:.1f} s: "
            f"{counts}, {len(interrupted)} interrupted (checkpointed), {len(not_started)} not started, "
            f"{len(failed)} failed. Re-run the same command to continue.",
            flush=True,
        )
        return EXIT_STATUS.get(jobs.stop_signal, 128 + jobs.stop_signal)
    extra = f", {len(unchosen)} tuned cell(s) without a rate" if unchosen else ""
    if outcome.get("elsewhere"):
        extra += f", {len(outcome['elsewhere'])} held by another process (left to it; re-run to collect them)"
    print(f"grid {preset['name']} finished in {seconds:.1f} s; {len(failed)} failed{extra}")
    return 1 if failed or unchosen else 0


def without_rate(grid: GridPlan, tasks: list[str], variants: list[str]) -> list[str]:
    """The `variant/task` cells among these whose tuning has chosen no rate yet (their final runs are not planned)."""
    return [
        f"{c['variant']}/{c['task']} ({c['status']})"
        for c in grid.cells
        if c["status"] != "chosen" and c["task"] in tasks and c["variant"] in variants
    ]


def experts_ready(preset: dict, grid: GridPlan) -> tuple[bool, str]:
    """Whether the X-LoRA stage can be planned (every expert cell has its rate and its runs finished), and why not."""
    table = preset.get("xlora", {})
    experts, expert_tasks = table.get("experts", []), table.get("expert_tasks", preset["tasks"])
    missing = without_rate(grid, expert_tasks, experts)
    if missing:
        return False, f"no rate chosen yet for {', '.join(missing)}"
    left = [
        r.run_dir.name for r in grid.runs if r.variant in experts and r.task in expert_tasks and status(r) != "done"
    ]
    return not left, f"{len(left)} expert run(s) not finished"


def planned_count(preset: dict, grid: GridPlan) -> int:
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


def dry_run(args, preset: dict, grid: GridPlan, todo: list[PlannedRun], inputs, out_dir: Path, settings) -> int:
    """--dry_run: list every run and its status, the runs later stages will add, and the planned count."""
    runs = grid.runs
    for run in grid.tuning:
        print(f"  {status(run):6s} tune   {run.run_dir.name}")
    for run in runs:
        print(f"  {status(run):6s} {'final  ' if run.stage else ''}{run.run_dir.name}")
    if grid.waiting:
        cells = sum(c["status"] != "chosen" for c in grid.cells)
        print(
            f"then, once each cell's tuning runs are done: {grid.waiting} final runs at the chosen rates ({cells} "
            f"cells x {len(preset['seeds'])} seeds)"
        )
        dead = [f"{c['variant']}/{c['task']}" for c in grid.cells if c["status"] == "all diverged"]
        if dead:
            print(f"  every candidate diverged for {', '.join(dead)}: lower their range (a [tune] lr list) and re-run")
    pending = bool(todo or grid.waiting)
    if "transfer" in preset:
        pairs = preset["transfer"]["pairs"]
        if pending:
            per_source = {source: sum(1 for s, _ in pairs if s == source) for source, _ in pairs}
            count = sum(per_source.get(task, 0) * len(preset["seeds"]) for task in preset["tasks"]) * len(
                preset["variants"]
            )
            print(
                f"then, once every source run is done: {count} transfer runs, {count} from-scratch controls and "
                f"a CKA analysis of each source model (pairs {pairs})"
            )
        else:
            stage, _ = plan_transfer(preset, runs, inputs)
            print(f"transfer stage: {len(stage)} jobs")
            for run in stage:
                print(f"  {status(run):6s} {run.task:16s} {(run.done_file or run.run_dir).relative_to(out_dir)}")
    if "xlora" in preset:
        if pending:
            count = xlora_count(preset)
            print(f"then, once the expert runs ({preset['xlora']['experts']}) are done: {count} X-LoRA runs")
        else:
            xplan = plan_xlora(preset, runs, inputs, out_dir)
            for run in xplan.tuning + xplan.runs:
                print(f"  {status(run):6s} {'tune   ' if run.stage == 'tune' else ''}{run.run_dir.name}")
            if xplan.waiting:
                print(f"then, once X-LoRA's tuning runs are done: {xplan.waiting} X-LoRA runs at the chosen rate")
    if preset.get("tune") is not None:
        final = len(runs) + grid.waiting
        xlora = xlora_count(preset)
        print(
            f"planned: {len(grid.tuning)} tuning runs + {final} final runs"
            + (f" + {xlora} X-LoRA runs" if xlora else "")
            + f" = {planned_count(preset, grid)} runs"
        )
    if args.launcher != "local" and (grid.tuning or todo):
        first = [r for r in grid.tuning if status(r) != "done"] or todo
        print(f"sbatch file of the array (--launcher {args.launcher} submits it through submitit):")
        print(launchers.sbatch_script(settings, out_dir / "slurm", preset["name"], len(first)))
    return 0


def transfer_stage(preset: dict, runs: list[PlannedRun], inputs: list[str], out_dir: Path) -> tuple[list, list]:
    """A transfer preset's second stage, planned from its finished source runs and recorded in
    transfer.json: (every job of the stage, those not done yet)."""
    stage, manifest = plan_transfer(preset, runs, inputs)
    write_transfer_manifest(out_dir, preset, stage, manifest)
    return stage, [r for r in stage if status(r) != "done"]


def launch_cluster(args, preset, grid: GridPlan, todo, out_dir: Path, inputs, settings) -> int:
    """--launcher slurm / submitit_local: submit the pending runs as one array (with --wait, wait for
    them); a [tune] preset's final runs, and a transfer or X-LoRA preset's second stage, follow the same
    way once the runs they depend on are done (with --wait in this call, else by a re-run of it)."""
    threads = args.threads or settings.cpus_per_run
    tuning_left = left(grid.tuning)
    tuning_busy = any(status(r) == "running" for r in grid.tuning)
    stages = [("tuning runs", tuning_left)] if tuning_left or tuning_busy else [("runs", todo)]
    runs, failed = grid.runs, 0
    while stages:
        label, pending = stages.pop(0)
        start = time.perf_counter()
        submitted, queued = launchers.submit(args.launcher, pending, out_dir, settings, preset["name"], threads)
        seconds = time.perf_counter() - start
        for run, job_id in queued:
            print(f"  queued  {run.name} (job {job_id}, still pending or running: not submitted again)")
        if submitted:
            ids = sorted({str(job.job_id).split("_")[0] for _, job in submitted})
            print(
                f"submitted {len(submitted)} {label} as job(s) {', '.join(ids)} in {seconds:.2f} s "
                f"({seconds / len(submitted):.3f} s per run); logs in {out_dir / 'logs'}, job ids in "
                f"{out_dir / 'slurm' / launchers.JOBS_FILE}",
                flush=True,
            )
        for run, job in submitted if args.wait else []:
            try:
                job.result()
                print(f"  ok      {run.name}", flush=True)
            except Exception as error:  # noqa: BLE001 - submitit re-raises the job's error: report, go on
                if run.stage == "tune" and status(run) == "done":  # a diverged candidate: a trial's result
                    print(f"  diverged {run.name} (a candidate rate that scores below every other)", flush=True)
                    continue
                failed += 1
                print(f"  FAILED  {run.name}: {str(error).strip().splitlines()[-1]}", flush=True)
        if label == "tuning runs":
            if all(status(r) == "done" for r in grid.tuning):
                grid = plan_grid(preset, out_dir, inputs)
                tuning.write_record(out_dir, preset["tune"], grid.cells)
                runs = grid.runs
                record_variant_names(out_dir, runs)
                missing = without_rate(grid, preset["tasks"], list(preset["variants"]))
                if missing:
                    failed += len(missing)
                    print(f"no rate chosen for {', '.join(missing)}: their final runs are not submitted")
                print(f"tuning stage done: {tuning_summary(grid.cells)}", flush=True)
                stages.append(("runs", left(runs)))
            else:
                print("the final runs are submitted by a re-run of this command once every tuning run is done")
        if label == "X-LoRA tuning runs":
            following = xlora_stage(preset, grid, inputs, out_dir)
            if following[0] == "X-LoRA runs":  # every tuning run done: the choice is made
                stages.append(following)
            else:
                print("X-LoRA's final runs are submitted by a re-run of this command once its tuning runs are done")
        if label == "runs" and ("transfer" in preset or "xlora" in preset):
            if not grid.waiting and all(status(r) == "done" for r in runs):
                if "transfer" in preset:
                    stages.append(("transfer-stage jobs", transfer_stage(preset, runs, inputs, out_dir)[1]))
                if "xlora" in preset:
                    stages.append(xlora_stage(preset, grid, inputs, out_dir))
            elif "xlora" in preset and experts_ready(preset, grid)[0] and "transfer" not in preset:
                stages.append(xlora_stage(preset, grid, inputs, out_dir))
            else:
                print("the second stage is submitted by a re-run of this command once every first-stage run is done")
    return 1 if failed else 0


def write_sweep(preset: dict, args, out_dir: Path, inputs: list[str]) -> int:
    """--wandb_sweep OUT.yaml: a grid sweep whose points are the grid's runs (validated first)."""
    import yaml

    if preset.get("tune") is not None:
        raise InputError(
            f"error: {args.preset}: a [tune] preset's final runs depend on its tuning runs' results, which a wandb "
            "grid sweep cannot express; run it with ablate.py (locally or --launcher slurm)"
        )

    plan(preset, out_dir, inputs, dry_run=True)  # every point's flags are valid before agents start
    config = launchers.sweep_config(preset, args.preset, out_dir, inputs)
    try:
        args.wandb_sweep.write_text(yaml.safe_dump(config, sort_keys=False))
    except OSError as error:
        raise InputError(f"error: --wandb_sweep {args.wandb_sweep}: cannot write it ({error.strerror})") from None
    points = len(preset["tasks"]) * len(preset["variants"]) * len(preset["seeds"])
    print(
        f"wrote {args.wandb_sweep}: a grid sweep over {points} runs into {out_dir}. Start it with\n"
        f"  wandb sweep {args.wandb_sweep}\n  wandb agent <entity/project/sweep id>   (on any number of machines "
        f"that share {out_dir})"
    )
    if "transfer" in preset or "xlora" in preset:
        print("the second stage is not in the sweep: run `ablate.py PRESET` once every first-stage run is done")
    return 0


def run_point(preset: dict, out_dir: Path, inputs: list[str], task: str, variant: str, seed: int) -> int:
    """Run one point of the grid in the foreground, exactly as the grid runs it (a wandb sweep agent's
    command): the same flags and folder; a finished run does nothing, an interrupted one resumes."""
    if task not in preset["tasks"] or variant not in preset["variants"] or seed not in preset["seeds"]:
        raise InputError(
            f"error: ({task}, {variant}, {seed}) is not a point of grid {preset['name']}: tasks {preset['tasks']}, "
            f"variants {list(preset['variants'])}, seeds {preset['seeds']}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = {**preset, "tasks": [task], "variants": {variant: preset["variants"][variant]}, "seeds": [seed]}
    grid = plan_grid(selected, out_dir, inputs)
    if not grid.runs:
        why = grid.cells[0]["status"] if grid.cells else "pending"
        raise InputError(
            f"error: {variant} on {task}: its learning rate is not chosen ({why} among its [tune] runs); "
            "run the grid's tuning stage first: python -m experiments.ablate PRESET"
        )
    (run,) = grid.runs
    if status(run) == "done":
        print(f"{run.run_dir} is already finished; nothing to do")
        return 0
    if status(run) == "running":
        print(f"{run.run_dir} is being written by process {lock_holder(run.run_dir)}; not started again")
        return 0
    if "random_init" in preset.get("model", {}):
        tiny_checkpoint(out_dir, preset["model"]["random_init"])
    argv = [*run.argv, *(["--resume"] if status(run) == "resume" else [])]
    os.execv(sys.executable, [sys.executable, "-m", run.module, *argv])  # signals and output go to the run


def _check_inputs(argv: list[str]) -> None:
    """A run's data (fetched when missing and allowed) and tokenizer, once per task before any job starts."""
    from train.cli import check_data

    parser = ArgumentParser(prog="ablate")
    parser.add_argument("--data_dir")
    parser.add_argument("--tokenizer")
    parser.add_argument("--task")
    known, _ = parser.parse_known_args(argv)
    check_data(parser, [known.task], known.data_dir, known.tokenizer)


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


def write_transfer_manifest(out_dir: Path, preset: dict, stage: list[PlannedRun], manifest: list[dict]) -> None:
    """transfer.json (which runs belong together, for experiments/report.py) and the variant names of the
    stage's runs in variants.json (config hash -> the preset's variant name)."""
    (out_dir / "transfer.json").write_text(
        json.dumps({"settings": preset["transfer"], "runs": manifest}, indent=2) + "\n"
    )
    record_variant_names(out_dir, stage)


def record_variant_names(out_dir: Path, stage: list[PlannedRun]) -> None:
    """Add a stage's runs to variants.json (config hash -> the preset's variant name, for the report)."""
    names_file = out_dir / "variants.json"
    names = json.loads(names_file.read_text()) if names_file.is_file() else {}
    for run in stage:
        if run.done_file is None:
            names[run.run_dir.name.rsplit("-", 1)[1]] = run.variant
    names_file.write_text(json.dumps(names, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(exit_status(main))
