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
A preset with a [transfer] table adds a second stage once its runs are done (train/cli/transfer.py).
A preset with a [tune] table trains each method at its own learning rate: one dev-only run per candidate
rate and (method, task) first, then the seeds at the best dev rate (experiments/tuning.py; docs/experiments.md).
A preset with an [xlora] table adds X-LoRA runs once their experts are done: per task and seed, a
`--peft_method xlora` run mixing that seed's runs of the `experts` variants on the `expert_tasks`
(modules/xlora.py); they are rows of the grid like any variant (label `xlora`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from experiments import launchers, tuning
from experiments.inputs import InputError, reported
from experiments.jobs import InProcessJobs, Jobs, call_main, run_jobs
from experiments.planning import (
    REPO,
    GridPlan,
    GridPreset,
    PlannedRun,
    _check_inputs,
    experts_ready,
    left,
    load_preset,
    plan,
    plan_grid,
    plan_transfer,
    plan_xlora,
    planned_count,
    record_variant_names,
    status,
    tiny_checkpoint,
    transfer_stage,
    tuning_summary,
    without_rate,
    xlora_cells,
    xlora_count,
    xlora_stage,
    xlora_tuning_count,
)
from task_data.common import DataError, ensure_data
from train.base import console
from train.cli.exits import exit_status
from train.cli.parse import ArgumentParser
from train.run.index import update_index
from train.run.legacy import legacy_folders, migrate_legacy
from train.run.lock import lock_holder
from train.tasks import TASKS
from train.trainer.lifecycle import EXIT_STATUS


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
    out_dir = (args.out_dir or REPO / "ablations" / preset.name).absolute()
    # a folder given relative to where ablate was started means that folder, wherever the jobs run
    absolute = {
        name: str(Path(v).absolute()) if Path(v).exists() else v
        for name in ("data_dir", "tokenizer")
        if (v := getattr(args, name))
    }
    inputs = [word for name, value in absolute.items() for word in (f"--{name}", value)]
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
    runs, tune = grid.runs, preset.tune
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
            f"grid {preset.name}: {len(grid.tuning)} tuning runs ({tune_done} already done, {len(tune_todo)} to "
            f"run), then {len(runs) + grid.waiting} final runs ({final_done} already done, {len(todo)} to run, "
            f"{grid.waiting} waiting for their cell's tuning) -> {out_dir}"
        )
    else:
        print(
            f"grid {preset.name}: {len(runs)} runs, {len(runs) - len(todo) - len(held)} already done, {len(todo)} "
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
    model_spec = preset.model
    for task in dict.fromkeys(r.task for r in grid.tuning + runs):
        _check_inputs(next(r.argv for r in grid.tuning + runs if r.task == task))
    targets = {target for _, target in (preset.transfer or {}).get("pairs", [])} - set(preset.tasks)
    try:
        ensure_data(sorted({name for t in targets for name in TASKS[t].data_files()}), args.data_dir)
    except DataError as error:
        raise InputError(f"error: transfer target data: {error}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    update_index(out_dir)  # every finished run has its runs.tsv row (a run killed after metrics.json had none)
    if "random_init" in model_spec:
        tiny_checkpoint(out_dir, model_spec["random_init"])
    write_grid_record(out_dir, preset, args.preset, grid)
    if args.launcher not in ("local", "inprocess"):
        return launch_cluster(args, preset, grid, todo, out_dir, inputs, settings)
    return run_here(args, preset, grid, todo, tune_todo, out_dir, inputs, gpus)


def write_grid_record(out_dir: Path, preset: GridPreset, preset_path: Path, grid: GridPlan) -> None:
    """variants.json (config hash -> the preset's variant name), grid.json (what the grid plans, for
    the report) and the tuning record: what a report reads besides the runs."""
    runs, tune, model_spec = grid.runs, preset.tune, preset.model
    # config hash (the last part of a run folder's name) -> the preset's variant name, for reports
    names = {r.run_dir.name.rsplit("-", 1)[1]: r.variant for r in runs}
    (out_dir / "variants.json").write_text(json.dumps(names, indent=2) + "\n")
    (out_dir / "grid.json").write_text(
        json.dumps(
            {
                "name": preset.name,
                "preset": str(preset_path),
                "model": model_spec,
                "seeds": preset.seeds,
                "planned_runs": planned_count(preset, grid),
                "cells": [[variant, task] for variant in preset.variants for task in preset.tasks]
                + [list(cell) for cell in xlora_cells(preset)],
                "random_init": "random_init" in model_spec,
                "transfer": preset.transfer is not None,
                "tune": tune.to_dict() if tune is not None else None,
                "tuning_runs": len(grid.tuning) + xlora_tuning_count(preset),  # (X-LoRA's final runs are cells)
            },
            indent=2,
        )
        + "\n"
    )
    if tune is not None:
        tuning.write_record(out_dir, tune, grid.cells)


def run_here(args, preset: GridPreset, grid: GridPlan, todo, tune_todo, out_dir: Path, inputs, gpus) -> int:
    """Run the grid's stages on this machine (--launcher local or inprocess): the tuning runs, the final
    runs at the chosen rates, then the transfer and X-LoRA stages once their inputs are done; say what
    finished, and exit 0, 1 (failures, cells without a rate) or 130 / 143 (interrupted)."""
    runs, tune = grid.runs, preset.tune
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
                    f"grid {preset.name}, {what}, {len(stage) - len(stage_todo)} already done, {len(stage_todo)} "
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
                print(f"grid {preset.name}, tuning stage done: {tuning_summary(grid.cells)}", flush=True)
        if jobs.stop_signal is None:
            run_stage(runs, todo, "final runs at the chosen rates" if tune is not None else None)
        sources_unplanned = without_rate(grid, preset.tasks, list(preset.variants))
        if preset.transfer is not None and jobs.stop_signal is None and sources_unplanned:
            print(f"the transfer stage needs every source run; no rate was chosen for {sources_unplanned}", flush=True)
        elif preset.transfer is not None and jobs.stop_signal is None and outcome["elsewhere"]:
            print(
                f"the transfer stage waits: {len(outcome['elsewhere'])} source run(s) are held by another process; "
                "re-run when they have finished",
                flush=True,
            )
        elif preset.transfer is not None and jobs.stop_signal is None and not outcome["failed"]:
            stage, stage_todo = transfer_stage(preset, runs, inputs, out_dir)
            run_stage(
                stage,
                stage_todo,
                f"transfer stage: {len(stage)} jobs (transfer runs, from-scratch controls, CKA of each source model)",
            )
        elif preset.transfer is not None and outcome["failed"]:
            print("the transfer stage needs every source run: fix the failed runs and re-run", flush=True)
        xlora_ready, why = experts_ready(preset, grid)
        if preset.xlora is not None and jobs.stop_signal is None and xlora_ready:
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
        elif preset.xlora is not None and jobs.stop_signal is None:
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
            f"grid {preset.name} interrupted by {signal.Signals(jobs.stop_signal).name} after {seconds:.1f} s: "
            f"{counts}, {len(interrupted)} interrupted (checkpointed), {len(not_started)} not started, "
            f"{len(failed)} failed. Re-run the same command to continue.",
            flush=True,
        )
        return EXIT_STATUS.get(jobs.stop_signal, 128 + jobs.stop_signal)
    extra = f", {len(unchosen)} tuned cell(s) without a rate" if unchosen else ""
    if outcome.get("elsewhere"):
        extra += f", {len(outcome['elsewhere'])} held by another process (left to it; re-run to collect them)"
    print(f"grid {preset.name} finished in {seconds:.1f} s; {len(failed)} failed{extra}")
    return 1 if failed or unchosen else 0


def dry_run(args, preset: GridPreset, grid: GridPlan, todo: list[PlannedRun], inputs, out_dir: Path, settings) -> int:
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
            f"cells x {len(preset.seeds)} seeds)"
        )
        dead = [f"{c['variant']}/{c['task']}" for c in grid.cells if c["status"] == "all diverged"]
        if dead:
            print(f"  every candidate diverged for {', '.join(dead)}: lower their range (a [tune] lr list) and re-run")
    pending = bool(todo or grid.waiting)
    if preset.transfer is not None:
        pairs = preset.transfer["pairs"]
        if pending:
            per_source = {source: sum(1 for s, _ in pairs if s == source) for source, _ in pairs}
            count = sum(per_source.get(task, 0) * len(preset.seeds) for task in preset.tasks) * len(preset.variants)
            print(
                f"then, once every source run is done: {count} transfer runs, {count} from-scratch controls and "
                f"a CKA analysis of each source model (pairs {pairs})"
            )
        else:
            stage, _ = plan_transfer(preset, runs, inputs)
            print(f"transfer stage: {len(stage)} jobs")
            for run in stage:
                print(f"  {status(run):6s} {run.task:16s} {(run.done_file or run.run_dir).relative_to(out_dir)}")
    if preset.xlora is not None:
        if pending:
            count = xlora_count(preset)
            print(f"then, once the expert runs ({preset.xlora['experts']}) are done: {count} X-LoRA runs")
        else:
            xplan = plan_xlora(preset, runs, inputs, out_dir)
            for run in xplan.tuning + xplan.runs:
                print(f"  {status(run):6s} {'tune   ' if run.stage == 'tune' else ''}{run.run_dir.name}")
            if xplan.waiting:
                print(f"then, once X-LoRA's tuning runs are done: {xplan.waiting} X-LoRA runs at the chosen rate")
    if preset.tune is not None:
        final = len(runs) + grid.waiting
        xlora = xlora_count(preset)
        print(
            f"planned: {len(grid.tuning)} tuning runs + {final} final runs"
            + (f" + {xlora} X-LoRA runs" if xlora else "")
            + f" = {planned_count(preset, grid)} runs"
        )
    if args.launcher not in ("local", "inprocess") and (grid.tuning or todo):
        first = [r for r in grid.tuning if status(r) != "done"] or todo
        print(f"sbatch file of the array (--launcher {args.launcher} submits it through submitit):")
        print(launchers.sbatch_script(settings, out_dir / "slurm", preset.name, len(first)))
    return 0


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
        submitted, queued = launchers.submit(args.launcher, pending, out_dir, settings, preset.name, threads)
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
                tuning.write_record(out_dir, preset.tune, grid.cells)
                runs = grid.runs
                record_variant_names(out_dir, runs)
                missing = without_rate(grid, preset.tasks, list(preset.variants))
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
        if label == "runs" and (preset.transfer is not None or preset.xlora is not None):
            if not grid.waiting and all(status(r) == "done" for r in runs):
                if preset.transfer is not None:
                    stages.append(("transfer-stage jobs", transfer_stage(preset, runs, inputs, out_dir)[1]))
                if preset.xlora is not None:
                    stages.append(xlora_stage(preset, grid, inputs, out_dir))
            elif preset.xlora is not None and experts_ready(preset, grid)[0] and preset.transfer is None:
                stages.append(xlora_stage(preset, grid, inputs, out_dir))
            else:
                print("the second stage is submitted by a re-run of this command once every first-stage run is done")
    return 1 if failed else 0


def write_sweep(preset: GridPreset, args, out_dir: Path, inputs: list[str]) -> int:
    """--wandb_sweep OUT.yaml: a grid sweep whose points are the grid's runs (validated first)."""
    import yaml

    if preset.tune is not None:
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
    points = len(preset.tasks) * len(preset.variants) * len(preset.seeds)
    print(
        f"wrote {args.wandb_sweep}: a grid sweep over {points} runs into {out_dir}. Start it with\n"
        f"  wandb sweep {args.wandb_sweep}\n  wandb agent <entity/project/sweep id>   (on any number of machines "
        f"that share {out_dir})"
    )
    if preset.transfer is not None or preset.xlora is not None:
        print("the second stage is not in the sweep: run `ablate.py PRESET` once every first-stage run is done")
    return 0


def run_point(preset: GridPreset, out_dir: Path, inputs: list[str], task: str, variant: str, seed: int) -> int:
    """Run one point of the grid in the foreground, exactly as the grid runs it (a wandb sweep agent's
    command): the same flags and folder; a finished run does nothing, an interrupted one resumes."""
    if task not in preset.tasks or variant not in preset.variants or seed not in preset.seeds:
        raise InputError(
            f"error: ({task}, {variant}, {seed}) is not a point of grid {preset.name}: tasks {preset.tasks}, "
            f"variants {list(preset.variants)}, seeds {preset.seeds}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    selected = preset.point(task, variant, seed)
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
    if "random_init" in preset.model:
        tiny_checkpoint(out_dir, preset.model["random_init"])
    argv = [*run.argv, *(["--resume"] if status(run) == "resume" else [])]
    # The run's main, called in this process: once it has started, the agent's signals reach the run's own
    # handlers (it checkpoints and exits 130 / 143), its output is this command's, and there is no second
    # start-up. (No chdir or thread setting: as under the execv this replaced, the process ends with it.)
    return call_main(run.module, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main))
