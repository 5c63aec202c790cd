"""Grids beyond one machine (experiments/launchers.py): the slurm code path through submitit's local
executor, with a simulated preemption; the sbatch file's resources; the wandb sweep file."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from experiments import ablate, launchers, planning
from tests.conftest import DATA_DIR, REPO, plugin_env, run_command, write_grid_preset
from train.run import checkpoint as ckpt
from train.run.state import folder_state

INPUTS = ["--data_dir", str(DATA_DIR)]


def tiny_preset(tmp_path, tokenizer_dir, **extra) -> Path:
    limits = {"train_limit": 32, "dev_limit": 8, "test_limit": 2, "batch_size": 4, "epochs": 1, **extra}
    return write_grid_preset(tmp_path / "grid.toml", tokenizer_dir, "launch-test", **limits)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    return sum(1 for line in lines if '"train/loss"' in line)


def best_weights(run_dir: Path) -> dict:
    return load_file(str(ckpt.checkpoint_folder(run_dir / "checkpoints", "best") / "trainable.safetensors"))


@pytest.mark.slow
def test_slurm_path_through_submitit_survives_a_preemption(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """Two runs submitted as one array (submitit's LocalExecutor in place of sbatch); SIGTERM to one job
    mid-run: it checkpoints, requeues, continues with --resume and ends with the metrics and weights of
    the same run done without interruption."""
    preset = tiny_preset(tmp_path, tokenizer_dir)
    grid = tmp_path / "grid"
    # the jobs' training processes sleep 0.4 s per step (test plugin), so the signal lands mid-run
    monkeypatch.setenv("PYTHONPATH", plugin_env()["PYTHONPATH"])
    monkeypatch.setenv("GPT2_TEST_STEP_SLEEP", "0.4")
    command = [str(preset), "--out_dir", str(grid), "--launcher", "submitit_local", "--threads", "1", *INPUTS]
    assert ablate.main(command) == 0
    assert "submitted 2 runs" in capsys.readouterr().out
    jobs = launchers.read_jobs(grid)
    assert len(jobs) == 2 and all(record["launcher"] == "submitit_local" for record in jobs.values())
    preempted, other = sorted(jobs)
    run_dir = grid / preempted
    wait_for(lambda: logged_steps(run_dir) >= 2, 120, "the first run's second step")
    os.kill(int(jobs[preempted]["job_id"]), signal.SIGTERM)  # submitit's controller forwards it to the job
    wait_for(lambda: all(folder_state(grid / name) == "finished" for name in jobs), 300, "both runs to finish")

    record = json.loads((run_dir / "config.json").read_text())
    assert "resumed_with" in record, "the preempted run did not resume from its checkpoint"
    job_log = (grid / "logs" / f"{preempted}.log").read_text()
    assert job_log.count("\n$ ") == 2 and "--resume" in job_log.split("\n$ ")[2]
    assert "interrupted by SIGTERM" in job_log
    assert "resumed_with" not in json.loads((grid / other / "config.json").read_text())

    # The same run, uninterrupted, in another folder (same thread count: bit-for-bit on CPU).
    (planned,) = [r for r in planning.plan(planning.load_preset(preset), grid, INPUTS) if r.run_dir.name == preempted]
    argv = list(planned.argv)
    argv[argv.index("--out_dir") + 1] = str(tmp_path / "reference")
    done = run_command(["-m", "train", *argv], env={"OMP_NUM_THREADS": "1", "GPT2_TEST_STEP_SLEEP": ""}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = tmp_path / "reference" / preempted
    resumed_metrics = json.loads((run_dir / "metrics.json").read_text())
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    for key in ("dev_acc", "dev_f1", "selection_score", "best_step", "steps"):
        assert resumed_metrics[key] == reference_metrics[key], key
    resumed, uninterrupted = best_weights(run_dir), best_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)

    # Re-running submits nothing: both runs are done.
    assert ablate.main(command) == 0
    out = capsys.readouterr().out
    assert "2 runs, 2 already done, 0 to run" in out and "submitted" not in out


def test_sbatch_file_has_the_asked_resources_from_flags_and_preset(tmp_path, tokenizer_dir, capsys):
    preset = tiny_preset(tmp_path, tokenizer_dir)
    preset.write_text(preset.read_text() + '[slurm]\npartition = "gpu"\nmem = "64G"\nqos = "normal"\n')
    flags = ["--slurm_account", "proj42", "--slurm_gpus_per_run", "2", "--slurm_cpus_per_run", "12"]
    flags += ["--slurm_time_min", "90", "--slurm_qos", "high", "--slurm_extra", "constraint=h100", "exclude=node7"]
    assert ablate.main([str(preset), "--out_dir", str(tmp_path / "g"), "--dry_run", "--launcher", "slurm", *flags]) == 0
    script = capsys.readouterr().out.split("sbatch file of the array")[1]
    for line in [
        "#SBATCH --partition=gpu",  # the preset's
        "#SBATCH --mem=64G",
        "#SBATCH --qos=high",  # the flag over the preset
        "#SBATCH --account=proj42",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=90",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclude=node7",
        "#SBATCH --array=0-1%2",  # the grid's 2 pending runs, one array (parallelism capped at its size)
        f"#SBATCH --signal=USR2@{launchers.SIGNAL_DELAY_S}",  # the warning that checkpoints and requeues
        "#SBATCH --ntasks-per-node=1",
    ]:
        assert line in script.splitlines(), line
    assert not (tmp_path / "g").exists()  # a dry run writes nothing
    preset.write_text(preset.read_text() + "gpus = 3\n")
    with pytest.raises(SystemExit):
        ablate.main([str(preset), "--dry_run", "--launcher", "slurm"])
    assert "unknown field(s) ['gpus']" in capsys.readouterr().err


def test_a_recorded_job_that_is_still_running_is_not_submitted_again(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert launchers.job_alive({"launcher": "submitit_local", "job_id": str(sleeper.pid)})
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not launchers.job_alive({"launcher": "submitit_local", "job_id": str(sleeper.pid)})
    assert not launchers.job_alive(None)


@pytest.mark.slow
def test_wandb_sweep_enumerates_the_grid_and_its_command_makes_the_grids_run_folders(tmp_path, tokenizer_dir):
    preset = tiny_preset(tmp_path, tokenizer_dir, max_steps=8)
    preset.write_text(preset.read_text() + 'lora = ["--use_lora"]\n')
    grid, sweep_file = tmp_path / "grid", tmp_path / "sweep.yaml"
    assert ablate.main([str(preset), "--out_dir", str(grid), "--wandb_sweep", str(sweep_file), *INPUTS]) == 0
    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["method"] == "grid" and sweep["name"] == "launch-test"
    values = {name: spec["values"] for name, spec in sweep["parameters"].items()}
    points = set(itertools.product(values["task"], values["variant"], values["seed"]))
    planned = {
        (r.task, r.variant, r.seed): r.run_dir for r in planning.plan(planning.load_preset(preset), grid, INPUTS)
    }
    assert points == set(planned) and len(points) == 4

    # What `wandb agent` runs for a point: the command with its macros filled in (${args} as --key=value).
    def agent_command(task: str, variant: str, seed: int) -> list[str]:
        macros = {"${env}": "/usr/bin/env", "${interpreter}": sys.executable}
        command = [macros.get(word, word) for word in sweep["command"] if word != "${args}"]
        return [*command, f"--task={task}", f"--variant={variant}", f"--seed={seed}"]

    # One point as the agent starts it: one process, the run called inside it, so the agent's SIGTERM
    # reaches the run, which checkpoints and exits 143 (its steps slowed by the test plugin: the signal,
    # sent once step 1 is logged, has 7 steps of 1 s to land before the last one lets the run finish).
    stopped = planned[("sst", "base", 1)]
    env = plugin_env(GPT2_TEST_STEP_SLEEP="1")
    proc = subprocess.Popen(agent_command("sst", "base", 1), cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: logged_steps(stopped) >= 1 or proc.poll() is not None, 120, "the point's first step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted by SIGTERM" in err, err[-2000:]
    assert folder_state(stopped) == "interrupted"
    # The next agent on that point resumes it; another point runs (both here, in this process: same argv).
    for task, variant, seed in [("sst", "base", 1), ("sst", "lora", 2)]:
        command = agent_command(task, variant, seed)
        done = run_command(command[command.index("-m") :], cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert folder_state(planned[(task, variant, seed)]) == "finished"
        record = json.loads((planned[(task, variant, seed)] / "config.json").read_text())
        assert record["grid"] == "launch-test"  # the grid's wandb group
    assert "resumed_with" in json.loads((stopped / "config.json").read_text())
    finished = {p for p in grid.iterdir() if (p / "metrics.json").is_file()}
    assert finished == {planned[("sst", "base", 1)], planned[("sst", "lora", 2)]}
    with pytest.raises(SystemExit, match="not a point"):
        ablate.main([str(preset), "--out_dir", str(grid), "--task", "sst", "--variant", "dora", "--seed", "1"])


def test_grid_job_command_uses_torchrun_for_several_gpus_resumes_and_pickles_without_its_process(tmp_path):
    import pickle

    run_dir = tmp_path / "sst-base-s1"
    job = launchers.GridJob("train", ["--task", "sst"], str(run_dir), str(tmp_path / "log"), nproc=2, threads=4)
    assert job.command()[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        "--task",
        "sst",
    ]
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.json").write_text("{}")  # an interrupted run: it continues
    single = launchers.GridJob("train", ["--task", "sst"], str(run_dir), str(tmp_path / "log"), nproc=1, threads=4)
    assert single.command()[1:] == ["-m", "train", "--task", "sst", "--resume"]
    analysis = launchers.GridJob("experiments.cka", ["RUN"], str(run_dir), str(tmp_path / "log"), 1, 4, resumable=False)
    assert analysis.command()[1:] == ["-m", "experiments.cka", "RUN"]  # CKA has no --resume
    single.process = subprocess.Popen([sys.executable, "-c", "pass"])
    single.process.wait()
    again = pickle.loads(pickle.dumps(single))
    assert again.process is None and again.argv == single.argv and again.nproc == 1
    requeued = single.checkpoint().function  # what submitit requeues: the same run, no process attached
    assert isinstance(requeued, launchers.GridJob) and requeued.run_dir == single.run_dir and requeued.process is None


@pytest.mark.slow
def test_wait_runs_a_transfer_preset_through_both_stages(tmp_path, tokenizer_dir, capsys):
    preset = tiny_preset(tmp_path, tokenizer_dir)
    text = preset.read_text().replace("seeds = [1, 2]", "seeds = [1]")
    text += '[transfer]\npairs = [["sst", "cfimdb"]]\nflags = ["--dev_limit", "8", "--test_limit", "2"]\n[cka]\nn = 8\n'
    preset.write_text(text)
    grid = tmp_path / "grid"
    command = [str(preset), "--out_dir", str(grid), "--launcher", "submitit_local", "--wait", "--threads", "1"]
    assert ablate.main([*command, *INPUTS]) == 0
    out = capsys.readouterr().out
    assert "submitted 1 runs" in out and "submitted 3 transfer-stage jobs" in out and "FAILED" not in out
    (item,) = json.loads((grid / "transfer.json").read_text())["runs"]
    for key in ("source_run", "transfer_run", "scratch_run"):
        assert folder_state(Path(item[key])) == "finished", key
    assert Path(item["cka"]).is_file()
    assert len(launchers.read_jobs(grid)) == 4  # one recorded job per run and analysis
    assert (grid / "logs" / f"{Path(item['source_run']).name}-cka.log").is_file()


def test_analysis_jobs_of_different_runs_get_different_names():
    """CKA jobs all write into `<run>/cka`: their job records and log files must not collide."""
    runs = [
        planning.PlannedRun("cka sst", "lora", seed, [], "experiments.cka", Path(f"g/sst-lora-s{seed}/cka"), Path("x"))
        for seed in (1, 2)
    ]
    assert [run.name for run in runs] == ["sst-lora-s1-cka", "sst-lora-s2-cka"]
    training = planning.PlannedRun("sst", "lora", 1, [], "train", Path("g/sst-lora-s1"))
    assert training.name == "sst-lora-s1"


def test_bad_slurm_fields_transfer_pairs_and_transfer_manifest_are_named(tmp_path, tokenizer_dir, capsys):
    from experiments import report

    preset = tiny_preset(tmp_path, tokenizer_dir)
    with pytest.raises(SystemExit):
        ablate.main([str(preset), "--dry_run", "--launcher", "slurm", "--slurm_mem", "lots"])
    assert "slurm mem takes sbatch's form" in capsys.readouterr().err
    preset.write_text(preset.read_text() + '[slurm]\ngpus_per_run = "two"\n')
    with pytest.raises(SystemExit):
        ablate.main([str(preset), "--dry_run", "--launcher", "slurm"])
    assert "slurm gpus_per_run must be an integer, got 'two'" in capsys.readouterr().err
    paired = tiny_preset(tmp_path, tokenizer_dir)
    paired.write_text(paired.read_text() + '[transfer]\npairs = [["sst", "sonnet"]]\n')
    with pytest.raises(SystemExit, match=r"pairs name \['sonnet'\]"):
        ablate.main([str(paired), "--out_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "runs.tsv").write_text((REPO / "results" / "transfer_smoke" / "runs.tsv").read_text())
    (grid / "transfer.json").write_text("{not json")
    with pytest.raises(SystemExit, match="transfer.json cannot be read"):
        report.main([str(grid)])
