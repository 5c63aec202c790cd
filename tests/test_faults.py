"""Fault injection: the record survives every fault. Kills at any moment (between metrics.json and its
runs.tsv row, during a checkpoint write), a damaged runs.tsv, a blow-up of the loss, a full disk,
corrupt run-folder files, hostile sizes and NaN/inf values each end with exactly one row per finished
run, a loadable checkpoint pointer, one `error:` line and the documented exit status, never a
traceback. The random-SIGKILL trials (subprocesses) are marked slow."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from experiments import report
from tests.conftest import DATA_DIR, REPO, kill_and_wait, run_command, run_paths
from train import sentiment
from train.run import checkpoint as ckpt

QUICK = ["--train_limit", "16", "--dev_limit", "4", "--test_limit", "2", "--batch_size", "4", "--wandb", "disabled"]


def sst_argv(model: Path, tokenizer_dir: Path, out: Path, *flags: str) -> list[str]:
    return ["--dataset", "sst", *run_paths(model, tokenizer_dir, out), *QUICK, *flags]


def rows(out: Path) -> list[dict]:
    with open(out / "runs.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning")]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def finished(tiny_ckpt, tokenizer_dir, tmp_path_factory) -> Path:
    """A finished 3-step run in its own grid folder (copied by each test that damages it)."""
    out = tmp_path_factory.mktemp("finished_grid")
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, out, "--max_steps", "3")) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def copy_grid(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    grid = tmp_path / "grid"
    shutil.copytree(run.parent, grid)
    return grid, grid / run.name


# ---------------------------------------------------------------- 1. a finished run without its row


def test_the_row_is_a_function_of_the_folder(finished):
    from train.run.index import row_from_folder

    (live,) = rows(finished.parent)
    rebuilt = row_from_folder(finished)
    assert {k: str(v) for k, v in rebuilt.items()} == live


def test_a_finished_run_that_lost_its_row_gets_it_from_resume_ablate_and_report(
    finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys
):
    grid, run = copy_grid(finished, tmp_path)
    header = (grid / "runs.tsv").read_text().splitlines()[0]
    # what a SIGKILL between metrics.json and the row leaves (the subprocess test below does it for real)
    (grid / "runs.tsv").write_text(header + "\n")
    argv = sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")
    assert sentiment.main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    assert [r["run_dir"] for r in rows(grid)] == [str(run)]
    # report: the index is synced with the folders before it is read
    (grid / "runs.tsv").unlink()
    assert report.main([str(grid), "--out", str(tmp_path / "report")]) == 0
    assert [r["run_dir"] for r in rows(grid)] == [str(run)]
    assert "| 1 |" in (tmp_path / "report" / "report.md").read_text() or "n=1" in (
        tmp_path / "report" / "report.md"
    ).read_text().replace(" ", "")


@pytest.mark.slow
def test_sigkill_between_metrics_json_and_the_row(tiny_ckpt, tokenizer_dir, tmp_path):
    """The issue's reproduction: hold runs.tsv's lock, kill -9 the run as soon as metrics.json exists."""
    import fcntl

    grid = tmp_path / "grid"
    grid.mkdir()
    lock = open(grid / "runs.tsv.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    argv = sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "2")
    process = subprocess.Popen([sys.executable, "-m", "train.sentiment", *argv], cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not list(grid.glob("*/metrics.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
        time.sleep(0.05)
    kill_and_wait(process)
    lock.close()
    assert not (grid / "runs.tsv").exists() or len(rows(grid)) == 0
    done = run_command(["-m", "train.sentiment", *argv, "--resume"], cwd=REPO)  # only the killed run is a process
    assert done.returncode == 0 and "already finished" in done.stdout, done.stderr
    assert len(rows(grid)) == 1


def _train(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train.sentiment", *argv], cwd=REPO, stderr=subprocess.PIPE, **kwargs
    )


@pytest.mark.slow
def test_sigkills_at_random_moments_then_resume_match_the_uninterrupted_run(tiny_ckpt, tokenizer_dir, tmp_path):
    """Seeded random moments after the run folder appears (imports excluded), with a checkpoint at
    every step, so most kills land in or near a checkpoint write; then the user's --resume. The killed
    runs are processes; the reference and the resumes run in this process, one thread each, as the
    killed runs do (tests.conftest.run_command)."""
    reference_out = tmp_path / "reference"
    one_thread = {"OMP_NUM_THREADS": "1"}
    reference = run_command(
        ["-m", "train.sentiment", *sst_argv(tiny_ckpt[0], tokenizer_dir, reference_out, "--save_every", "1")],
        one_thread,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    (reference_run,) = [p for p in reference_out.iterdir() if p.is_dir()]
    expected = ckpt.load_checkpoint(ckpt.checkpoint_folder(reference_run / "checkpoints", "best"))[0]
    theirs = json.loads((reference_run / "metrics.json").read_text())
    for seed in (0, 1):
        out = tmp_path / f"killed-{seed}"
        argv = sst_argv(tiny_ckpt[0], tokenizer_dir, out, "--save_every", "1")
        process = _train(argv, env={**os.environ, **one_thread})
        deadline = time.monotonic() + 240
        while not list(out.glob("*/config.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 2.0))  # the tiny run takes ~2-3 s from here
        kill_and_wait(process)
        assert b"Traceback" not in process.stderr.read()
        resumed = run_command(
            ["-m", "train.sentiment", *argv, *(["--resume"] if any(out.iterdir()) else [])], one_thread
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        assert len(rows(out)) == 1
        ours = json.loads((run / "metrics.json").read_text())
        assert [ours[k] for k in ("best_value", "best_step", "steps")] == [
            theirs[k] for k in ("best_value", "best_step", "steps")
        ]
        mine = ckpt.load_checkpoint(ckpt.checkpoint_folder(run / "checkpoints", "best"))[0]
        assert mine.keys() == expected.keys()
        assert all(torch.equal(mine[k], expected[k]) for k in mine), f"seed {seed}: resume is not bit-exact"


# ---------------------------------------------------------------- 2. a damaged runs.tsv


@pytest.mark.parametrize(
    "damage",
    ["garbage header", "no header", "truncated last row", "not utf-8", "empty file", "duplicate rows"],
)
def test_a_damaged_index_is_rebuilt_from_the_folders_with_one_warning(finished, tmp_path, capsys, damage):
    grid, run = copy_grid(finished, tmp_path)
    path = grid / "runs.tsv"
    header, row = path.read_text().splitlines()
    damaged = {
        "garbage header": "hello\tworld\n" + row + "\n",
        "no header": row + "\n",
        "truncated last row": header + "\n" + row[: len(row) // 2] + "\n",
        "not utf-8": header + "\n" + row + "\n\xff\xfe junk\n",
        "empty file": "",
        "duplicate rows": header + "\n" + row + "\n" + row + "\n",
    }[damage]
    path.write_bytes(damaged.encode("utf-8", "surrogateescape") if damage != "not utf-8" else damaged.encode("latin-1"))
    assert report.main([str(grid), "--out", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if damage != "duplicate rows":  # two rows of one run are merged silently: the folder says which is right
        assert len([line for line in err.splitlines() if line.startswith("warning:")]) == 1, err
        assert list(grid.glob("runs.tsv.damaged-*")), "the damaged file is kept aside"
    (fixed,) = rows(grid)
    assert fixed["run_dir"] == str(run) and fixed["best_value"] == str(
        json.loads((run / "metrics.json").read_text())["best_value"]
    )


def test_a_row_that_disagrees_with_its_folder_is_refreshed_from_the_folder(finished, tmp_path):
    grid, run = copy_grid(finished, tmp_path)
    path = grid / "runs.tsv"
    header, row = path.read_text().splitlines()
    names = header.split("\t")
    fields = row.split("\t")
    fields[names.index("best_value")] = "0.999"  # a stale row (e.g. written before the run was extended)
    path.write_text(header + "\n" + "\t".join(fields) + "\n")
    assert report.main([str(grid), "--out", str(tmp_path / "report")]) == 0
    (fixed,) = rows(grid)
    assert fixed["best_value"] == str(json.loads((run / "metrics.json").read_text())["best_value"])


def test_syncing_a_grid_whose_rows_are_current_builds_no_row(finished, tmp_path, monkeypatch):
    """Every run's finish syncs its whole grid folder: a folder whose row is current is recognised from
    its files, without building its row (and its model config) again; a stale one is rebuilt."""
    from train.run import index

    grid, run = copy_grid(finished, tmp_path)
    built = []
    real = index.runs_row
    monkeypatch.setattr(index, "runs_row", lambda *args: built.append(args[0]) or real(*args))
    index.update_index(grid)
    assert built == [run]  # copied: its row named the folder it was made in
    built.clear()
    index.update_index(grid)
    assert built == []
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "steps": metrics["steps"] + 1}))  # extended since
    index.update_index(grid)
    assert built == [run] and rows(grid)[0]["steps"] == str(metrics["steps"] + 1)


def test_finishing_a_run_into_a_damaged_index_never_writes_an_empty_row(finished, tiny_ckpt, tokenizer_dir, tmp_path):
    grid, run = copy_grid(finished, tmp_path)
    (grid / "runs.tsv").write_text("garbage\n")
    argv = sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "2")
    assert sentiment.main(argv) == 0
    found = rows(grid)
    assert len(found) == 2 and all(r["run_dir"] and r["config_hash"] and r["best_value"] for r in found)
    assert list(found[0]) == (finished.parent / "runs.tsv").read_text().splitlines()[0].split("\t")


# ---------------------------------------------------------------- 3. divergence from step 1


def test_lr_1e3_blows_up_and_exits_3_with_no_checkpoint_after_it(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = sst_argv(tiny_ckpt[0], tokenizer_dir, tmp_path, "--lr", "1e3", "--save_every", "1", "--max_steps", "8")
    assert sentiment.main(argv) == 3
    err = capsys.readouterr().err
    assert "loss blow-up" in err and "Traceback" not in err, err
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    info = json.loads((run / "diverged.json").read_text())
    last = ckpt.checkpoint_folder(run / "checkpoints", "last")
    # the weights of step N-1 gave the blow-up at step N: no checkpoint of step N-1 or later is kept
    assert last is None or json.loads((last / "state.json").read_text())["step"] < info["step"] - 1
    assert not (run / "metrics.json").exists() and not (tmp_path / "runs.tsv").exists()


def test_the_blow_up_bound_is_judged_from_the_first_step():
    from train.trainer.lifecycle import DivergenceGuard

    guard = DivergenceGuard(spike_factor=10, blowup_factor=10, floor=10.8)
    assert guard.check("sst", 1.6) is None
    assert guard.check("sst", 50.0) is None  # below 10 x max(1.6, 10.8): not yet a blow-up
    verdict = guard.check("sst", 6.75e6)
    assert verdict is not None and verdict[1] and "blow-up" in verdict[0]
    assert guard.check("sst", float("nan"))[1]


# ---------------------------------------------------------------- 4. corrupt run-folder files

CORRUPTIONS = {"garbage": b"\x00garbage{", "list": b"[1, 2]", "not utf-8": b"\xff\xfe\xfa", "empty": b""}
RUN_FILES = [
    "config.json",
    "metrics.json",
    "diverged.json",
    "log.jsonl",
    "checkpoints/last.json",
    "checkpoints/best.json",
    "checkpoints/last-*/state.json",
    "checkpoints/last-*/trainable.safetensors",
    "checkpoints/last-*/optimizer.safetensors",
]


def _damage(run: Path, pattern: str, corruption: str) -> Path:
    found = list(run.glob(pattern))
    target = found[0] if found else run / pattern
    target.write_bytes(CORRUPTIONS[corruption])
    return target


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("pattern", RUN_FILES)
def test_resume_with_a_corrupt_file_is_one_line_or_a_clean_resume(
    finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys, pattern, corruption
):
    grid, run = copy_grid(finished, tmp_path)
    if pattern != "metrics.json":
        (run / "metrics.json").unlink()  # an interrupted run: resume reads its checkpoint and log
    _damage(run, pattern, corruption)
    capsys.readouterr()
    status = sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume"))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if status == 0:
        assert len(rows(grid)) == 1, "a resumed run keeps exactly one row"
    else:
        assert status == 2 and err.count("error:") == 1, err
        assert str(run.name) in err or pattern.split("/")[-1].replace("*", "") in err or "run" in err, err


@pytest.mark.parametrize("corruption", ["garbage", "list", "not utf-8"])
@pytest.mark.parametrize(
    "pattern",
    [
        "config.json",
        "checkpoints/best.json",
        "checkpoints/best-*/state.json",
        "checkpoints/best-*/trainable.safetensors",
    ],
)
def test_evaluate_of_a_run_with_a_corrupt_file_is_one_line(finished, tmp_path, capsys, pattern, corruption):
    from train.cli import evaluate

    grid, run = copy_grid(finished, tmp_path)
    _damage(run, pattern, corruption)
    status = evaluate.main(
        [
            "--task",
            "sst",
            "--model",
            str(run),
            "--out_dir",
            str(tmp_path / "eval"),
            "--dev_limit",
            "4",
            "--test_limit",
            "2",
        ]
    )
    err = capsys.readouterr().err
    if pattern == "checkpoints/best.json":  # a pointer is a convenience: the best-* folder it lost is used
        assert status == 0 and "using the newest complete best checkpoint" in err, err
        return
    assert status == 2 and "Traceback" not in err, err
    assert err.count("error:") == 1, err


def test_a_cut_log_line_is_reported_on_resume(finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    log = run / "log.jsonl"
    text = log.read_bytes()
    log.write_bytes(text[: len(text) - 10])  # the last line cut mid-way
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 0
    err = capsys.readouterr().err
    assert "1 line(s) of" in err and "could not be read" in err, err
    assert all(json.loads(line) for line in log.read_text().splitlines())


def test_a_state_json_missing_a_key_is_one_line(finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    (state_file,) = run.glob("checkpoints/last-*/state.json")
    state = json.loads(state_file.read_text())
    del state["progress"]
    state_file.write_text(json.dumps(state))
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 2
    assert "state.json" in one_error(capsys)


def test_a_checkpoint_config_that_is_a_json_list_is_one_line(tokenizer_dir, tmp_path, capsys):
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as stop:
        sentiment.main(sst_argv(model, tokenizer_dir, tmp_path / "out"))
    assert stop.value.code == 2
    assert "config.json" in one_error(capsys)


# ---------------------------------------------------------------- 4. a full disk


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_leaves_no_tmp(
    tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    calls = {"n": 0}
    original = ckpt.save_file

    def full(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:  # the second checkpoint's first file; safetensors' own error type and text
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full)
    argv = sst_argv(tiny_ckpt[0], tokenizer_dir, tmp_path, "--save_every", "1", "--max_steps", "6")
    assert sentiment.main(argv) == 2
    line = one_error(capsys)
    assert line.startswith("error: disk full while writing the checkpoint at step") and "--resume" in line
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert ckpt.checkpoint_folder(run / "checkpoints", "last") is not None  # the previous one stays
    monkeypatch.setattr(ckpt, "save_file", original)
    assert sentiment.main([*argv, "--resume"]) == 0


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root; the injected-failure test above runs")
def test_a_real_full_disk_then_freed_space_and_resume(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "small"
    out.mkdir()
    # one checkpoint of the tiny model is ~19 MB: 32 MB holds one, not two
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(out)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine refuses a tmpfs mount: {mounted.stderr.decode().strip()}")
    try:
        argv = sst_argv(tiny_ckpt[0], tokenizer_dir, out, "--save_every", "1", "--train_limit", "24", "--epochs", "1")
        assert sentiment.main(argv) == 2
        line = one_error(capsys)
        assert "disk full while writing the checkpoint at step" in line
        (run,) = [p for p in out.iterdir() if p.is_dir()]
        assert not list((run / "checkpoints").glob(".*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=256m", str(out)], check=True)  # free space
        assert sentiment.main([*argv, "--resume"]) == 0
        assert len(rows(out)) == 1
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


# ---------------------------------------------------------------- 7. same-name checkpoint replacement


@pytest.mark.parametrize("crash_at", ["replace", "pointer", "delete"])
def test_a_kill_during_a_same_step_rewrite_leaves_a_loadable_pointer(tmp_path, monkeypatch, crash_at):
    directory = tmp_path / "checkpoints"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save(marker: float) -> None:
        weights = {"w": torch.full((2, 2), marker)}
        ckpt.save_checkpoint(directory, "best", 100, weights, optimizer, scheduler, {"step": 100})

    save(1.0)

    class Killed(BaseException):
        pass

    targets = {
        "replace": (ckpt.os, "replace"),
        "pointer": (ckpt, "atomic_write_text"),
        "delete": (ckpt.shutil, "rmtree"),
    }
    owner, name = targets[crash_at]
    original = getattr(owner, name)

    def crash(*args, **kwargs):
        if crash_at == "delete" and ".tmp" in str(args[0]):
            return original(*args, **kwargs)  # the staging clean-up before the write
        raise Killed

    monkeypatch.setattr(owner, name, crash)
    with pytest.raises(Killed):
        save(2.0)
    monkeypatch.setattr(owner, name, original)
    folder = ckpt.checkpoint_folder(directory, "best")
    weights, state, _ = ckpt.load_checkpoint(folder)
    expected = 2.0 if crash_at == "delete" else 1.0  # the pointer switched only in the last case
    assert state["step"] == 100 and float(weights["w"][0, 0]) == expected
    save(3.0)  # the next save cleans up and points at the newest
    weights, _, _ = ckpt.load_checkpoint(ckpt.checkpoint_folder(directory, "best"))
    assert float(weights["w"][0, 0]) == 3.0
    assert len([p for p in directory.iterdir() if p.is_dir()]) <= 2


# ---------------------------------------------------------------- 8. file modes


def test_created_files_get_the_umask_mode(tmp_path):
    """Text, and safetensors files too (safetensors writes its own 0600 file: a saved model.safetensors
    was unreadable to the colleagues sharing the folder)."""
    from model import GPT2Config, GPT2LMHeadModel
    from model.files import atomic_write_text, write_safetensors

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "runs.tsv", "x\n")
        write_safetensors(tmp_path / "weights.safetensors", {"w": torch.zeros(2)})
        GPT2LMHeadModel(GPT2Config.from_preset("tiny")).save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(previous)
    for name in ("runs.tsv", "weights.safetensors", "ckpt/model.safetensors", "ckpt/config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# ---------------------------------------------------------------- 5. sizes, and item 8's messages

HOSTILE_SIZES = {
    "n_layer": ({"n_layer": 1_000_000}, [], "more than any machine can hold"),
    "vocab_size 1e12": ({"vocab_size": 10**12}, [], "more than any machine can hold"),
    "vocab_size 1e9": ({"vocab_size": 10**9}, [], "cannot train on cpu"),
    "lora_r": ({}, ["--use_lora", "--lora_r", "1000000"], "cannot train on cpu"),
    "peft r": ({}, ["--peft_method", "lora", "--peft_config", '{"r": 100000000}'], "cannot train on cpu"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SIZES))
def test_sizes_that_cannot_fit_are_one_line_before_anything_is_built(
    tokenizer_dir, tmp_path, monkeypatch, capsys, case
):
    from model import gpt2

    config_changes, flags, message = HOSTILE_SIZES[case]
    model = tmp_path / "ckpt"
    model.mkdir()
    config = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12}
    (model / "config.json").write_text(json.dumps({**config, "n_head": 12, **config_changes}))
    (model / "model.safetensors").write_bytes(b"")  # never read: the size is refused first

    def no_building(*args, **kwargs):
        raise AssertionError("a model was built on a real device")

    monkeypatch.setattr(gpt2.GPT2LMHeadModel, "from_pretrained", no_building)
    started = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        sentiment.main(sst_argv(model, tokenizer_dir, tmp_path / "out", *flags))
    assert stop.value.code == 2
    line = one_error(capsys)
    assert message in line, line
    if "cannot train" in message:
        assert "GiB" in line and "parameters" in line  # it names the estimate
    assert time.monotonic() - started < 60


def test_the_stack_formula_matches_a_built_model():
    from model import GPT2Config, GPT2LMHeadModel
    from model.size import estimate, stack_parameters

    assert stack_parameters(50257, 1024, 768, 12, None) == 124_439_808  # gpt2
    config = GPT2Config.from_preset("gpt2", n_layer=3, use_lora=True, lora_r=4)
    with torch.device("meta"):
        built = GPT2LMHeadModel(config)
    from model.trainable import set_trainable

    counts = set_trainable(built)
    found = estimate(config)  # built at depth 1 and 2, extrapolated to 3
    assert (found.total, found.trainable) == (counts["total"], counts["trainable"])
    # estimates are cached by the whole config: one knob apart is another entry, the same config the same
    wider = estimate(config.replace(lora_r=8))
    assert wider.total > found.total and wider.trainable > found.trainable
    from model import size

    builds = []
    real_count = size._count
    size._count = lambda c: builds.append(c.n_layer) or real_count(c)
    try:
        assert estimate(GPT2Config.from_preset("gpt2", n_layer=3, use_lora=True, lora_r=4)) == found
        assert builds == []  # the same config again: nothing built
        estimate(config.replace(lora_r=5))
        assert builds == [1, 2]  # a new one: built at depth 1 and 2
    finally:
        size._count = real_count


def test_a_peft_config_that_is_a_json_list_is_named_as_json(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sentiment.main(
            sst_argv(tiny_ckpt[0], tokenizer_dir, tmp_path, "--peft_method", "lora", "--peft_config", "[1,2]")
        )
    line = one_error(capsys)
    assert "expected a JSON object, got list" in line and "No such file" not in line


def test_a_gold_sonnet_file_shorter_than_the_prompts_stops_before_training(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    from task_data.sonnets import FILES
    from train import sonnet

    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    gold = data / FILES["dev_gold"]
    lines = gold.read_text().splitlines()
    numbers = [i for i, line in enumerate(lines) if line.strip().isdigit()]
    gold.write_text("\n".join(lines[: numbers[len(numbers) // 2]]) + "\n")  # the first half of the sonnets
    argv = [*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "out"), "--data_dir", str(data), *QUICK]
    with pytest.raises(SystemExit) as stop:
        sonnet.main(argv)
    assert stop.value.code == 2
    line = one_error(capsys)
    assert "no gold sonnet for dev prompt" in line and str(gold) in line
    assert not (tmp_path / "out").exists()


def test_a_sonnet_file_whose_numbers_were_lost_warns(tmp_path, caplog):
    from task_data.sonnets import read_sonnet_file

    lines = ["THE SONNETS", "", "1"] + [f"line {i} of many," for i in range(300)]
    path = tmp_path / "sonnets.txt"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        read_sonnet_file(path)
    assert any("has 300 lines (a sonnet has 14)" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 6. NaN and inf in every float flag


def _float_flags() -> list[tuple[str, list[str], int]]:
    """(flag, the selection it needs, how many values) for every float setting and config knob, found
    through the settings classes, so a new knob is covered without editing this list."""
    import typing

    from model.config import field_hint
    from train.base.settings import MultitaskSettings, OutputSettings, RuntimeSettings, TrainingSettings
    from train.cli.parse import config_fields
    from train.tasks import TASKS

    def floats(hint) -> int:  # how many float values the flag takes (0: not a float flag)
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:  # a (low, high) pair
            return len(args) if args and all(a is float for a in args) else 0
        return 1 if hint is float or float in args else 0

    found = []
    for cls in (TrainingSettings, OutputSettings, RuntimeSettings):
        found += [(f"--{f.name}", ["--task", "sst"], floats(cls.hints()[f.name])) for f in cls.knobs()]
    for name, task in TASKS.items():
        if task.settings is not None:
            found += [
                (f"--{f.name}", ["--task", name], floats(task.settings.hints()[f.name])) for f in task.settings.knobs()
            ]
    multitask = ["--tasks", "sst", "quora"]
    found += [(f"--{f.name}", multitask, floats(MultitaskSettings.hints()[f.name])) for f in MultitaskSettings.knobs()]
    # a config knob's value is checked when the config is built, whether or not its variant is on
    found += [(f"--{f.name}", ["--task", "sst"], floats(field_hint(f.name))) for f in config_fields()]
    return [item for item in found if item[2]]


def test_the_float_flag_matrix_covers_the_issue_s_flags():
    flags = {flag for flag, _, _ in _float_flags()}
    named = ["--lr", "--warmup", "--attn_pdrop", "--graph_dropout", "--weight_decay", "--max_grad_norm"]
    named += ["--lora_alpha", "--lora_plus_ratio", "--kan_entropy", "--spike_factor", "--save_every_minutes"]
    named += ["--lora_dropout", "--blowup_factor", "--sampling_temperature"]
    assert set(named) <= flags, set(named) - flags


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_for_every_float_flag(tiny_ckpt, tmp_path, capsys, value):
    from train.cli import entry

    failures = []
    for flag, selection, count in _float_flags():
        if count > 1 and value.startswith("-"):
            continue  # argparse reads a second "-inf" as a flag; nan and inf cover the pair
        point = entry.MULTITASK if "--tasks" in selection else entry.GENERIC
        values = [f"{flag}={value}"] if count == 1 else [flag, *[value] * count]  # "=": -inf is not a flag
        argv = [*selection, "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path), *values]
        try:
            entry.parse(point, argv, inputs=False)
            failures.append(f"{flag} {value}: accepted")
        except SystemExit as stop:
            err = capsys.readouterr().err
            if stop.code != 2 or "Traceback" in err or "finite" not in err:
                failures.append(f"{flag} {value}: exit {stop.code}: {err.strip()[:200]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- a lost checkpoint pointer


def test_a_lost_last_pointer_resumes_from_the_newest_complete_checkpoint(
    finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys
):
    """last.json is a convenience: without it (or with it damaged) --resume takes the newest complete
    last-* folder, says so, and deletes no checkpoint it did not just supersede; a newer folder that
    is incomplete (no optimizer file) is not taken for a checkpoint."""
    for damage in ("missing", "garbage"):
        grid, run = copy_grid(finished, tmp_path / damage)
        (run / "metrics.json").unlink()  # interrupted at its last checkpoint
        pointer = run / "checkpoints" / "last.json"
        if damage == "missing":
            pointer.unlink()
        else:
            pointer.write_text("{not json")
        (saved,) = run.glob("checkpoints/last-*")
        partial = run / "checkpoints" / "last-000009"
        partial.mkdir()
        shutil.copy(saved / "state.json", partial / "state.json")
        logged = (run / "log.jsonl").read_text()
        capsys.readouterr()
        assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 0
        err = capsys.readouterr().err
        assert f"using the newest complete last checkpoint, {saved}" in err, err
        assert "starting it again from step 0" not in err
        assert (run / "log.jsonl").read_text().startswith(logged)  # continued, not restarted
        assert json.loads((run / "metrics.json").read_text())["steps"] == 3


def test_a_run_folder_with_only_checkpoint_folders_is_interrupted_not_dead(finished, tmp_path):
    from train.run.state import folder_state, saved_checkpoints

    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    (run / "checkpoints" / "last.json").unlink()
    assert folder_state(run) == "interrupted"
    (saved,) = saved_checkpoints(run / "checkpoints", "last")
    (saved / "optimizer.safetensors").unlink()  # incomplete: no longer a checkpoint
    assert saved_checkpoints(run / "checkpoints", "last") == [] and folder_state(run) == "dead"


# ---------------------------------------------------------------- parseable but wrong run-folder files

STATE_DAMAGE = {
    "rng={}": lambda s: s.update(rng={}),
    "rng.ranks=[{}]": lambda s: s.update(rng={"ranks": [{}]}),
    "progress='x'": lambda s: s.update(progress="x"),
    "progress.step='x'": lambda s: s["progress"].update(step="x"),
    "progress.step=1e9": lambda s: s["progress"].update(step=10**9),
    "negative progress.epoch": lambda s: s["progress"].update(epoch=-1),
    "negative step": lambda s: s.update(step=-3),
    "optimizer={}": lambda s: s.update(optimizer={}),
    "param_groups=[]": lambda s: s["optimizer"].update(param_groups=[]),
    "scheduler=[]": lambda s: s.update(scheduler=[]),
    "lr='x'": lambda s: s["optimizer"]["param_groups"][0].update(lr="x"),
}


@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_a_parseable_but_wrong_state_json_is_one_line_naming_the_field(
    finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys, damage
):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    (state_file,) = run.glob("checkpoints/last-*/state.json")
    state = json.loads(state_file.read_text())
    STATE_DAMAGE[damage](state)
    state_file.write_text(json.dumps(state))
    rows_before = rows(grid)
    capsys.readouterr()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 2
    line = one_error(capsys)
    assert "state.json" in line and "must be" in line, line
    assert not (run / "metrics.json").exists() and rows(grid) == rows_before  # nothing recorded as finished


def _replace_tensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


TENSOR_DAMAGE = {
    "an optimizer tensor of the wrong shape": lambda t: t.update(
        {k: v[..., :1].contiguous() for k, v in t.items() if k.endswith("exp_avg")}
    ),
    "no RNG tensors": lambda t: [t.pop(k) for k in [k for k in t if k.startswith("rng.")]],
    "an RNG tensor of the wrong size": lambda t: t.update(
        {k: v[:10].contiguous() for k, v in t.items() if k.startswith("rng.")}
    ),
}


@pytest.mark.parametrize("damage", list(TENSOR_DAMAGE))
def test_checkpoint_tensors_that_do_not_fit_are_one_line(finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys, damage):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    (tensors,) = run.glob("checkpoints/last-*/optimizer.safetensors")
    _replace_tensors(tensors, TENSOR_DAMAGE[damage])
    capsys.readouterr()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 2
    assert "does not fit this run" in one_error(capsys)


def test_an_optimizer_file_from_another_run_is_one_line(finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    other = tmp_path / "other"
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, other, "--max_steps", "3", "--use_lora")) == 0
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    (mine,) = run.glob("checkpoints/last-*/optimizer.safetensors")
    (theirs,) = other.glob("*/checkpoints/last-*/optimizer.safetensors")
    shutil.copy(theirs, mine)
    capsys.readouterr()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 2
    assert "does not fit this run" in one_error(capsys)


@pytest.mark.parametrize("field,value", [("identity", []), ("training", "x"), ("extra_epochs", "2"), ("run", 7)])
def test_a_config_json_field_of_the_wrong_type_is_one_line(
    finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys, field, value
):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    record = json.loads((run / "config.json").read_text())
    record[field] = value
    (run / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 2
    line = one_error(capsys)
    assert "config.json" in line and f"{field} must be" in line, line


@pytest.mark.slow
def test_an_interrupted_extension_is_finished_by_a_plain_resume_at_the_extended_length(
    tiny_ckpt, tokenizer_dir, tmp_path, capsys
):
    """`--resume --extend_epochs 1` killed mid-way: plain --resume finishes exactly that extension (the
    same steps and weights as an uninterrupted extension); extending it again before it finished is
    refused, since it would add the epochs twice."""
    from safetensors.torch import load_file

    from tests.conftest import plugin_env
    from tests.test_signals import wait_for_step

    flags = ["--train_limit", "16", "--dev_limit", "4", "--test_limit", "2", "--batch_size", "4", "--epochs", "1"]
    flags += ["--wandb", "disabled", "--use_kora"]  # 4 steps an epoch; KoRA trains without peft's import
    first = tmp_path / "first"
    assert sentiment.main(["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, first), *flags]) == 0
    shutil.copytree(first, tmp_path / "whole")
    shutil.copytree(first, tmp_path / "cut")

    def argv(out: Path, *more: str) -> list[str]:
        return ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, out), *flags, "--resume", *more]

    assert sentiment.main(argv(tmp_path / "whole", "--extend_epochs", "1")) == 0
    command = [sys.executable, "-m", "train.sentiment", *argv(tmp_path / "cut", "--extend_epochs", "1")]
    env = plugin_env(OMP_NUM_THREADS="1", GPT2_TEST_STEP_SLEEP="0.3")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_step(tmp_path / "cut", 5, proc)
    proc.send_signal(2)
    proc.communicate(timeout=60)
    (run,) = [p for p in (tmp_path / "cut").iterdir() if p.is_dir()]
    assert not (run / "metrics.json").exists() and (run / "metrics.before-extension-4-steps.json").exists()
    capsys.readouterr()
    assert sentiment.main(argv(tmp_path / "cut", "--extend_epochs", "1")) == 2
    assert "plain --resume finishes it" in one_error(capsys)
    assert sentiment.main(argv(tmp_path / "cut")) == 0
    (whole,) = [p for p in (tmp_path / "whole").iterdir() if p.is_dir()]
    for folder in (run, whole):
        assert json.loads((folder / "metrics.json").read_text())["steps"] == 8
    weights = [load_file(str(next(f.glob("checkpoints/last-*")) / "trainable.safetensors")) for f in (run, whole)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_duplicate_rows_of_a_run_whose_folder_is_gone_count_once(finished, tmp_path):
    from train.run.index import read_index

    grid, run = copy_grid(finished, tmp_path)
    lines = (grid / "runs.tsv").read_text().splitlines()
    header, row = lines[0].split("\t"), dict(zip(lines[0].split("\t"), lines[1].split("\t"), strict=True))
    gone = {**row, "run_dir": str(grid / "gone-run"), "config_hash": "deadbeef", "run": "gone-run"}
    extra = "\t".join(gone[c] for c in header)
    (grid / "runs.tsv").write_text("\n".join([*lines, extra, extra, extra]) + "\n")
    rows = read_index(grid)
    assert len(rows) == 2 and sorted(r["config_hash"] for r in rows) == sorted([row["config_hash"], "deadbeef"])
    assert len((grid / "runs.tsv").read_text().splitlines()) == 3  # the file says it once too


def test_a_resume_with_another_cpu_thread_count_warns(finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    record = json.loads((run / "config.json").read_text())
    assert record["cpu_threads"] == torch.get_num_threads()  # what the result depends on is recorded
    record["cpu_threads"] = torch.get_num_threads() + 6
    (run / "config.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 0
    err = capsys.readouterr().err
    assert f"trained with {torch.get_num_threads() + 6} CPU thread(s)" in err and "not be bit-identical" in err
    saved = json.loads((run / "config.json").read_text())
    assert saved["cpu_threads"] == torch.get_num_threads() + 6
    assert saved["cpu_threads_on_resume"] == torch.get_num_threads()


@pytest.mark.parametrize("text", ['{"lora_dropout": NaN}', '{"r": Infinity}', '{"eva_config": {"tau": -Infinity}}'])
def test_nan_and_inf_inside_peft_config_are_refused(tiny_ckpt, tokenizer_dir, tmp_path, capsys, text):
    argv = sst_argv(tiny_ckpt[0], tokenizer_dir, tmp_path, "--peft_method", "lora", "--peft_config", text)
    with pytest.raises(SystemExit) as stop:
        sentiment.main(argv)
    assert stop.value.code == 2
    assert "NaN or infinity" in one_error(capsys)


@pytest.mark.parametrize("name", ["log.jsonl", ".lock"])
def test_a_folder_where_a_run_file_belongs_is_one_line(finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys, name):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    target = run / name
    if target.exists():
        target.unlink()
    target.mkdir()
    capsys.readouterr()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 2
    line = one_error(capsys)
    assert f"{target} is a folder" in line and "move it aside and run again" in line
    assert target.is_dir()  # left as it was


def test_a_relative_model_path_is_recorded_so_evaluate_works_from_anywhere(
    tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    from train.cli import evaluate

    shutil.copytree(tiny_ckpt[0], tmp_path / "ckpt" / "tiny")
    monkeypatch.chdir(tmp_path)
    argv = sst_argv(Path("ckpt/tiny"), tokenizer_dir, tmp_path / "runs", "--max_steps", "2")
    assert sentiment.main(argv) == 0
    (run,) = (tmp_path / "runs").glob("sst-*")
    record = json.loads((run / "config.json").read_text())
    assert record["spec"]["checkpoint"]["source"] == str(tmp_path / "ckpt" / "tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    flags = ["--dev_limit", "4", "--test_limit", "2", "--tokenizer", str(tokenizer_dir), "--data_dir", str(DATA_DIR)]
    assert evaluate.main(["--task", "sst", "--model", str(run), "--out_dir", str(tmp_path / "eval"), *flags]) == 0


def test_resume_of_a_run_folder_that_holds_nothing_yet_starts_it(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    """A full disk while a run folder is created leaves it (or just its lock) and says "free space and
    --resume": that advice must work."""
    argv = sst_argv(tiny_ckpt[0], tokenizer_dir, tmp_path, "--max_steps", "2")
    assert sentiment.main(argv) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    shutil.rmtree(run)
    run.mkdir()
    (run / ".lock").touch()
    capsys.readouterr()
    assert sentiment.main([*argv, "--resume"]) == 0
    assert "holds nothing to resume yet; starting it from step 0" in capsys.readouterr().err
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2


def test_a_read_only_out_dir_is_one_line_for_evaluate_and_report(finished, tmp_path, capsys, monkeypatch):
    """(Faked: the tests run as a user a read-only mode does not stop.)"""
    import errno

    from experiments import report
    from train.cli import evaluate

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    grid, run = copy_grid(finished, tmp_path)
    monkeypatch.setattr(evaluate, "atomic_write_json", read_only)
    flags = ["--dev_limit", "4", "--test_limit", "2", "--out_dir", str(tmp_path / "eval")]
    assert evaluate.main(["--task", "sst", "--model", str(run), *flags]) == 2
    assert "Read-only file system" in one_error(capsys)
    monkeypatch.setattr(report, "plot_metric_vs_params", read_only)
    with pytest.raises(SystemExit, match="cannot write .*Read-only file system"):
        report.main([str(grid)])


def test_a_second_ctrl_c_says_whether_a_checkpoint_is_kept(finished, tmp_path, capsys):
    from train.cli import entry
    from train.run.folder import HELD

    grid, run = copy_grid(finished, tmp_path)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for held, expected in ((empty, "none had been saved yet"), (run, "the last one saved (last-000003) is kept")):
        HELD.append(held)
        try:
            with pytest.raises(SystemExit) as stop, entry.stopped_at_once():
                raise KeyboardInterrupt
        finally:
            HELD.remove(held)
        assert stop.value.code == 130 and expected in capsys.readouterr().err


def test_the_memory_check_counts_a_steps_activations(monkeypatch):
    """--lora_r 1000000 on the tiny preset: 15 GiB of weights and AdamW state fit in 24 GiB, the rank-wide
    intermediates a step keeps for backward (one per token and adapted linear) do not."""
    from model import size
    from model.config import GPT2Config

    monkeypatch.setattr(size, "device_memory", lambda device: 24 * 2**30)
    huge = GPT2Config.from_preset("tiny", use_lora=True, lora_r=10**6)
    found = size.estimate(huge)
    assert found.static_bytes < 24 * 2**30  # the weights alone would pass
    adapted = len(huge.lora_targets) * huge.n_layer
    assert found.activation_per_token >= adapted * 10**6 * 4  # at least its rank-wide fp32 intermediates
    with pytest.raises(ValueError, match="keeps about .* GiB of activations"):
        size.check_fits(huge, "cpu", 8 * 128)
    size.check_fits(huge, "cpu", 8)  # a short enough step fits
    size.check_fits(GPT2Config.from_preset("gpt2", use_lora=True), "cpu", 8 * 512)  # a real run is not refused


def test_a_read_only_run_folder_is_one_line_for_training(
    finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys, monkeypatch
):
    """(Faked as above.) A fresh run and a resume that cannot write their folder end in one line, exit 2."""
    import errno

    from train.trainer import loop

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(loop, "atomic_write_json", read_only)
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, tmp_path / "fresh", "--max_steps", "2")) == 2
    assert "read-only file system" in one_error(capsys)
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3", "--resume")) == 2
    assert "read-only file system" in one_error(capsys)


def test_a_fresh_start_on_a_run_that_lost_its_pointer_says_it_is_interrupted(
    finished, tiny_ckpt, tokenizer_dir, tmp_path, capsys
):
    grid, run = copy_grid(finished, tmp_path)
    (run / "metrics.json").unlink()
    (run / "checkpoints" / "last.json").unlink()
    capsys.readouterr()
    assert sentiment.main(sst_argv(tiny_ckpt[0], tokenizer_dir, grid, "--max_steps", "3")) == 2
    assert "holds an interrupted run (last checkpoint at step 3); pass --resume" in one_error(capsys)


def test_a_second_ctrl_c_caught_in_a_finaliser_still_stops_the_run():
    """Python prints a KeyboardInterrupt raised inside a `__del__` as "Exception ignored ... Traceback" and
    goes on; while a run's signals are handled it is raised again in the main thread instead."""
    import types

    from train.trainer.lifecycle import StopSignals

    with StopSignals() as signals:
        signals.received = signal.SIGINT  # the first Ctrl-C; the second one's interrupt is re-raised
        info = types.SimpleNamespace(exc_value=KeyboardInterrupt(), exc_type=KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            sys.unraisablehook(info)
            for _ in range(10**6):  # the interrupt arrives at the next check of the main thread
                time.sleep(0)
    assert "StopSignals" not in repr(sys.unraisablehook)  # the previous hook is back
