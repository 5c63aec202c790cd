"""Run an ablation grid from a preset: tasks x variants x seeds, every run in its own folder.

    python scripts/ablate.py scripts/presets/smoke.toml --out_dir ablations/smoke --jobs 2
    python scripts/report.py ablations/smoke

Each run is `python -m train --task <task> <common flags> <task flags> <variant flags> --seed S
--out_dir <grid folder>`; all rows land in `<grid folder>/runs.tsv` and share one wandb group (the
grid's name). Tasks are the task registry's; run folders carry a hash of every result-changing
setting, so variants that differ in any flag (e.g. `--lora_targets qkv`, `--batch_size 16`) are
distinct runs. Re-running the same command skips runs whose metrics.json exists and resumes runs
that were killed (`--resume` from their last checkpoint), so a killed grid just continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train import entry  # noqa: E402
from train.tasks import TASKS  # noqa: E402

MODULE = "train"  # python -m train --task <task> ...


@dataclass
class PlannedRun:
    task: str
    variant: str
    seed: int
    argv: list[str]  # everything after `python -m <module>`
    module: str
    run_dir: Path


def load_preset(path: Path) -> dict:
    try:
        preset = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"error: {path}: {error}") from None
    for key in ("name", "tasks", "seeds", "variants"):
        if key not in preset:
            raise SystemExit(f"error: {path}: missing key {key!r}")
    unknown = [t for t in preset["tasks"] if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: {path}: unknown task(s) {unknown}; known: {list(TASKS)}")
    return preset


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


def tiny_checkpoint(folder: Path, preset_name: str) -> Path:
    """A randomly initialised GPT-2 of a test size, saved once per grid (seeded, so reproducible)."""
    import torch

    from model import GPT2Config, GPT2LMHeadModel

    path = folder / f"random-{preset_name}-checkpoint"
    if not (path / "model.safetensors").is_file():
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config.from_preset(preset_name)).save_pretrained(path)
    return path


def plan(preset: dict, out_dir: Path) -> list[PlannedRun]:
    model_spec = preset.get("model", {})
    if "random_init" in model_spec:
        model = str(tiny_checkpoint(out_dir, model_spec["random_init"]))
    else:
        model = model_spec.get("model", "gpt2")
    common = flag_list(preset.get("common", {}))
    runs = []
    for task in preset["tasks"]:
        for variant, variant_flags in preset["variants"].items():
            for seed in preset["seeds"]:
                argv = [
                    "--task",
                    task,
                    "--model",
                    model,
                    *common,
                    *preset.get("task_flags", {}).get(task, []),
                    *variant_flags,
                    "--seed",
                    str(seed),
                    "--out_dir",
                    str(out_dir),
                    "--wandb_group",
                    preset["name"],
                ]
                try:
                    run_dir = entry.planned_run_dir(entry.GENERIC, argv)
                except SystemExit:  # argparse printed what is wrong with the flags
                    raise SystemExit(
                        f"error: preset task {task!r}, variant {variant!r}: its flags are rejected "
                        f"by python -m {MODULE} (message above)"
                    ) from None
                runs.append(PlannedRun(task, variant, seed, argv, MODULE, run_dir))
    return runs


def status(run: PlannedRun) -> str:
    if (run.run_dir / "metrics.json").is_file():
        return "done"
    if (run.run_dir / "checkpoints" / "last.json").is_file():
        return "resume"
    return "new"


def execute(run: PlannedRun, threads: int, log_dir: Path) -> tuple[PlannedRun, int, float]:
    state = status(run)
    argv = list(run.argv)
    if state == "resume":
        argv.append("--resume")
    elif run.run_dir.exists():
        shutil.rmtree(run.run_dir)  # started but never checkpointed: nothing to keep
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    log_file = log_dir / f"{run.run_dir.name}.log"
    with open(log_file, "w") as log:
        code = subprocess.run(
            [sys.executable, "-m", run.module, *argv], cwd=REPO, stdout=log, stderr=log, env=env
        ).returncode
    return run, code, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--out_dir", type=Path, default=None, help="grid folder (default: ablations/<name>)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=None, help="threads per run (default: cores / jobs)")
    parser.add_argument("--dry_run", action="store_true", help="list the runs and their status only")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    out_dir = args.out_dir or REPO / "ablations" / preset["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(preset, out_dir)
    folders = [r.run_dir for r in runs]
    if len(set(folders)) != len(folders):
        dupes = sorted({f.name for f in folders if folders.count(f) > 1})
        raise SystemExit(f"error: preset variants that produce the same run: {dupes}")
    # config hash (the last part of a run folder's name) -> the preset's variant name, for reports
    names = {r.run_dir.name.rsplit("-", 1)[1]: r.variant for r in runs}
    (out_dir / "variants.json").write_text(json.dumps(names, indent=2) + "\n")
    model_spec = preset.get("model", {})
    (out_dir / "grid.json").write_text(
        json.dumps(
            {
                "name": preset["name"],
                "preset": str(args.preset),
                "model": model_spec,
                "seeds": preset["seeds"],
                "random_init": "random_init" in model_spec,
            },
            indent=2,
        )
        + "\n"
    )
    todo = [r for r in runs if status(r) != "done"]
    print(
        f"grid {preset['name']}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run "
        f"-> {out_dir}"
    )
    if args.dry_run:
        for run in runs:
            print(f"  {status(run):6s} {run.run_dir.name}")
        return 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    failed = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done, (run, code, seconds) in enumerate(pool.map(lambda r: execute(r, threads, log_dir), todo), 1):
            mark = "ok" if code == 0 else f"FAILED (exit {code}, see {log_dir / (run.run_dir.name + '.log')})"
            print(
                f"[{done}/{len(todo)}] {run.task:7s} {run.variant:12s} seed {run.seed}: {mark} ({seconds:.1f} s)",
                flush=True,
            )
            if code != 0:
                failed.append(run)
    print(f"grid {preset['name']} finished in {time.perf_counter() - start:.1f} s; {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
