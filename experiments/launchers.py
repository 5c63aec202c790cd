"""Running a grid's runs beyond this machine: SLURM job arrays through submitit, and wandb sweeps.

`experiments/ablate.py PRESET --launcher slurm` submits every pending run of the grid as one SLURM job
array through submitit. Each array task runs `GridJob`: the same `python -m train ...` command the
local launcher runs (its output in `<grid>/logs/<run>.log`), into the same grid folder, so the grid
folder must be on a filesystem the nodes share. A run asking for several GPUs (`gpus_per_run` > 1)
runs under `torchrun --standalone --nproc_per_node N` inside its job.

Preemption and time limits: submitit asks SLURM for a warning signal (`--signal USR2@<delay>`)
before the time limit; `GridJob` treats it, and a SIGTERM (preemption), the same way: the training
process gets SIGTERM, saves a checkpoint at the end of its current step and stops (the run
lifecycle's signal handling), then the job requeues itself (`scontrol requeue`) and the requeued
job continues the run with `--resume`. A run that was stopped without a requeue (e.g. a preemption
mode that cancels) is resubmitted with `--resume` by the next `ablate.py --launcher slurm`.

Job ids are kept in `<grid>/slurm/jobs.json`; re-running the command submits only runs that are
neither done nor pending/running under a recorded job. `--launcher submitit_local` is the same code
with submitit's LocalExecutor instead of sbatch (this machine, tests).

`experiments/ablate.py PRESET --wandb_sweep OUT.yaml` writes a wandb sweep (method `grid`) whose
parameters are the grid's tasks, variants and seeds; its command is `ablate.py PRESET --out_dir GRID
--task=T --variant=V --seed=S`, which runs that one point exactly as the grid would (same flags,
run folder, group).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import submitit

from experiments.inputs import InputError
from train.run.state import folder_state
from train.trainer.lifecycle import EXIT_STATUS

REPO = Path(__file__).resolve().parents[1]

LAUNCHERS = ("local", "inprocess", "slurm", "submitit_local")
JOBS_FILE = "jobs.json"
SIGNAL_DELAY_S = 180  # the warning before the time limit: enough for a gpt2 step plus a checkpoint write
ALIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}


@dataclass
class SlurmSettings:
    """Resources of one run's job; a preset's [slurm] table sets them, `--slurm_<name>` flags override."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_run: int = 1
    cpus_per_run: int = 8
    mem: str = "32G"
    time_min: int = 240
    array_parallelism: int = 64
    max_requeues: int = 10  # per run, time limits and preemptions together
    extra: list[str] = field(default_factory=list)  # more sbatch options as KEY=VALUE, e.g. constraint=h100

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def check(self) -> None:
        for name in self.names():  # a preset's TOML can hold any type
            default, value = getattr(SlurmSettings(), name), getattr(self, name)
            kind = (
                int
                if name in ("gpus_per_run", "cpus_per_run", "time_min", "array_parallelism", "max_requeues")
                else str
            )
            if name == "extra":
                ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
            else:
                ok = (value is None and default is None) or (isinstance(value, kind) and not isinstance(value, bool))
            if not ok:
                wanted = {"extra": "a list of KEY=VALUE strings"}.get(name, "an integer" if kind is int else "a string")
                raise ValueError(f"slurm {name} must be {wanted}, got {value!r}")
        for name in ("gpus_per_run", "cpus_per_run", "time_min", "array_parallelism", "max_requeues"):
            if getattr(self, name) < (0 if name in ("gpus_per_run", "max_requeues") else 1):
                raise ValueError(f"slurm {name} = {getattr(self, name)} is out of range")
        if not re.fullmatch(r"[0-9]+[KMGT]?", self.mem):
            raise ValueError(
                f"slurm mem takes sbatch's form, a number with an optional K/M/G/T unit (32G), got {self.mem!r}"
            )
        bad = [item for item in self.extra if "=" not in item or not item.split("=", 1)[0]]
        if bad:
            raise ValueError(f"slurm extra takes sbatch options as KEY=VALUE (e.g. constraint=h100), got {bad}")

    def sbatch_parameters(self, job_name: str) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters (sbatch options)."""
        parameters: dict[str, Any] = {
            "job_name": job_name,
            "nodes": 1,
            "ntasks_per_node": 1,  # one training command per job; torchrun starts the GPU processes
            "cpus_per_task": self.cpus_per_run,
            "mem": self.mem,
            "time": self.time_min,
            "signal_delay_s": SIGNAL_DELAY_S,
            "array_parallelism": self.array_parallelism,
            "stderr_to_stdout": True,
        }
        if self.gpus_per_run:
            parameters["gpus_per_node"] = self.gpus_per_run
        for name in ("partition", "account", "qos"):
            if getattr(self, name):
                parameters[name] = getattr(self, name)
        if self.extra:
            parameters["additional_parameters"] = dict(item.split("=", 1) for item in self.extra)
        return parameters


def slurm_settings(preset, overrides: dict[str, Any]) -> SlurmSettings:
    """The preset's [slurm] table, then the flags given (None = not given)."""
    table = dict(preset.slurm)
    unknown = sorted(set(table) - set(SlurmSettings.names()))
    if unknown:
        raise ValueError(f"[slurm] has unknown field(s) {unknown}; known: {SlurmSettings.names()}")
    table.update({k: v for k, v in overrides.items() if v is not None})
    settings = SlurmSettings(**table)
    settings.check()
    return settings


def sbatch_script(settings: SlurmSettings, folder: Path, job_name: str, array_size: int) -> str:
    """The sbatch file submitit writes for the grid's array (what `--dry_run` shows)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(
        command=command, folder=folder, map_count=array_size, **settings.sbatch_parameters(job_name)
    )


def wait_polling(process: subprocess.Popen) -> int:
    """The exit status, waited for by polling: `Popen.wait()` holds a lock that a signal handler (which
    runs on the same thread, in the middle of that wait) would wait on again, forever."""
    while (code := process.poll()) is None:
        time.sleep(0.2)
    return code


class GridJob(submitit.helpers.Checkpointable):
    """One grid run as a submitit job: the run's command in a child process; on the warning signal
    (USR2) or SIGTERM, the child checkpoints and stops, and `checkpoint` hands submitit the same job
    to requeue (which then continues the run with --resume)."""

    def __init__(
        self,
        module: str,
        argv: list[str],
        run_dir: str,
        log_file: str,
        nproc: int,
        threads: int,
        resumable: bool = True,  # a training run (--resume); not an analysis such as CKA
    ) -> None:
        self.module, self.argv, self.run_dir, self.log_file = module, list(argv), run_dir, log_file
        self.nproc, self.threads, self.resumable = nproc, threads, resumable
        self.process: subprocess.Popen | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "process": None}  # the pickled job never holds a process

    def command(self) -> list[str]:
        argv = list(self.argv)
        if self.resumable and folder_state(Path(self.run_dir)) in ("interrupted", "dead"):
            argv.append("--resume")
        if self.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"]
            return [*launcher, "-m", self.module, *argv]
        return [sys.executable, "-m", self.module, *argv]

    def __call__(self) -> dict[str, Any]:
        if self.resumable and folder_state(Path(self.run_dir)) == "finished":
            return {"run_dir": self.run_dir, "exit": 0, "seconds": 0.0, "note": "already finished"}
        # submitit set USR2 to "checkpoint and requeue" and ignores SIGTERM; a preemption's SIGTERM
        # must do the same as the time-limit warning.
        warning = signal.getsignal(submitit.JobEnvironment._usr_sig())
        if callable(warning):
            signal.signal(signal.SIGTERM, warning)
        command = self.command()
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        start = time.perf_counter()
        with open(self.log_file, "a") as log:
            log.write(f"\n$ {' '.join(command)}  (job {os.environ.get('SLURM_JOB_ID', os.getpid())})\n")
            log.flush()
            # its own session: it is signalled by this job only (once), never twice by a process group
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log, env=env, start_new_session=True)
            code = wait_polling(self.process)
        seconds = time.perf_counter() - start
        if code in EXIT_STATUS.values():
            raise RuntimeError(
                f"{self.run_dir} was interrupted (exit {code}, checkpointed) without a requeue; re-run "
                f"ablate.py to resubmit it with --resume"
            )
        if code != 0:
            raise RuntimeError(f"{self.run_dir} failed (exit {code}); see {self.log_file}")
        return {"run_dir": self.run_dir, "exit": code, "seconds": round(seconds, 2)}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the warning signal: stop the run at a checkpoint, then requeue."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            wait_polling(self.process)  # the run saves its checkpoint at the end of the current step
        return submitit.helpers.DelayedSubmission(GridJob(**self._arguments()))

    def _arguments(self) -> dict[str, Any]:
        keys = ("module", "argv", "run_dir", "log_file", "nproc", "threads", "resumable")
        return {key: getattr(self, key) for key in keys}


def read_jobs(grid: Path) -> dict[str, dict]:
    path = grid / "slurm" / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_jobs(grid: Path, jobs: dict[str, dict]) -> None:
    from model.files import atomic_write_json

    (grid / "slurm").mkdir(parents=True, exist_ok=True)
    atomic_write_json(grid / "slurm" / JOBS_FILE, jobs)


def job_alive(record: dict | None) -> bool:
    """Whether a recorded job is still pending or running (its run must not be submitted again)."""
    if not record:
        return False
    if record["launcher"] == "submitit_local":  # the job id is the controller's process id
        try:
            state = Path(f"/proc/{int(record['job_id'])}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return False
        return state != "Z"
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--jobs", str(record["job_id"]), "--format", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.strip() in ALIVE_STATES for line in out.stdout.splitlines())


def make_executor(launcher: str, folder: Path, settings: SlurmSettings, job_name: str):
    if launcher == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
        except RuntimeError as error:  # no srun: not on a SLURM cluster
            raise InputError(
                f"error: --launcher slurm needs SLURM on this machine (run it on the cluster's login node): {error}"
            ) from None
        executor.update_parameters(**settings.sbatch_parameters(job_name))
        return executor
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    executor.update_parameters(timeout_min=settings.time_min, signal_delay_s=5, stderr_to_stdout=True)
    return executor


def submit(
    launcher: str, runs: list, grid: Path, settings: SlurmSettings, job_name: str, threads: int
) -> tuple[list, list]:
    """Submit every run that is not already pending or running under a recorded job, as one array.
    Returns (submitted jobs, (run, job id) of the runs skipped as still queued or running)."""
    records = read_jobs(grid)
    skipped = [(run, records[run.name]["job_id"]) for run in runs if job_alive(records.get(run.name))]
    busy = {run.name for run, _ in skipped}
    pending = [run for run in runs if run.name not in busy]
    if not pending:
        return [], skipped
    (grid / "logs").mkdir(parents=True, exist_ok=True)
    executor = make_executor(launcher, grid / "slurm", settings, job_name)
    with executor.batch():
        handles = [
            executor.submit(
                GridJob(
                    run.module,
                    run.argv,
                    str(run.run_dir),
                    str(grid / "logs" / f"{run.name}.log"),
                    max(1, settings.gpus_per_run) if launcher == "slurm" else 1,
                    threads,
                    resumable=run.done_file is None,
                )
            )
            for run in pending
        ]
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    for run, handle in zip(pending, handles, strict=True):
        records[run.name] = {
            "job_id": handle.job_id,
            "launcher": launcher,
            "submitted_at": now,
            "settings": asdict(settings),
        }
    write_jobs(grid, records)
    return list(zip(pending, handles, strict=True)), skipped


# ---------------------------------------------------------------- wandb sweeps


def sweep_config(preset, preset_path: Path, grid: Path, extra: list[str]) -> dict[str, Any]:
    """A wandb sweep (grid search) over the preset's tasks x variants x seeds whose command runs one
    point through ablate.py: the same flags, run folder and wandb group as the grid's own run."""
    return {
        "name": preset.name,
        "description": f"experiments/ablate.py {preset_path}: {len(preset.tasks)} tasks x "
        f"{len(preset.variants)} variants x {len(preset.seeds)} seeds",
        "program": "experiments/ablate.py",
        "method": "grid",
        "parameters": {
            "task": {"values": list(preset.tasks)},
            "variant": {"values": list(preset.variants)},
            "seed": {"values": list(preset.seeds)},
        },
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "experiments.ablate",
            str(preset_path.resolve()),
            "--out_dir",
            str(grid.resolve()),
            *extra,
            "${args}",
        ],
    }
