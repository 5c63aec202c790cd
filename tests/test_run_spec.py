"""A run as one typed value: identity by type (RunSpec), the checkpoint by content, one writer per run
folder (the lock), and run folders written before RunSpec (migrated, still resumed and reported)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest

from model.config import GPT2Config
from model.fingerprint import checkpoint_identity
from modules.variant import JSONObject, knob
from tests.conftest import REPO, make_hf_checkpoint, plugin_env, run_command, run_paths
from train.base.settings import MultitaskSettings, OutputSettings, RuntimeSettings, TrainingSettings
from train.cli import entry
from train.run.folder import run_folder
from train.run.legacy import migrate_legacy
from train.run.lock import RunFolderBusy, RunLock, lock_holder
from train.run.spec import Checkpoint, RunSpec
from train.tasks.paraphrase import ParaphraseSettings
from train.tasks.sonnet import SonnetSettings

FIXTURE = REPO / "tests" / "fixtures" / "legacy_b10ef1d"


def base_spec(**changes) -> RunSpec:
    spec = RunSpec(
        label="multitask-quora-sonnet",
        tasks=("quora", "sonnet"),
        config=GPT2Config.from_preset("tiny"),
        checkpoint=Checkpoint("ckpt/tiny", {"digest": "0123456789abcdef"}),
        training=TrainingSettings(lr=1e-4),
        task_settings={
            "quora": ParaphraseSettings(),
            "sonnet": SonnetSettings(),
            "multitask": MultitaskSettings(),
        },
        output=OutputSettings(),
        runtime=RuntimeSettings(),
    )
    return dataclasses.replace(spec, **changes)


def changed_value(f: dataclasses.Field, hint) -> object:
    """A valid value other than the field's default, from its type and bounds alone."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
        origin = get_origin(hint)
    default = f.default
    if origin is Literal:
        return next(c for c in get_args(hint) if c != default)
    if hint is bool:
        return not default
    if hint is JSONObject:
        return {"quora": 2.0}
    if hint is int:
        return (default or 1) + 1
    if hint is float:
        if f.name == "train_fraction":
            return 0.5
        return (default or 0.5) * 0.5 + 0.125 if f.name != "spike_factor" else 20.0
    if hint is str:
        return "elsewhere" if f.name != "device" else "cpu"
    if origin is tuple and get_args(hint) == (str, Ellipsis):
        return ("elsewhere",)
    raise AssertionError(f"no changed value for {f.name}: {hint}")


def each_change(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f.name, changed_value(f, hints[f.name])


def with_setting(spec: RunSpec, where: str, name: str, value) -> RunSpec:
    if where in ("training", "output", "runtime"):
        return dataclasses.replace(spec, **{where: dataclasses.replace(getattr(spec, where), **{name: value})})
    settings = dict(spec.task_settings)
    settings[where] = dataclasses.replace(settings[where], **{name: value})
    return dataclasses.replace(spec, task_settings=settings)


# ---------------------------------------------------------------- identity by type


def test_every_training_and_task_setting_changes_the_identity_and_no_output_setting_does():
    base = base_spec()
    counts = {}
    for where, cls in (
        ("training", TrainingSettings),
        ("quora", ParaphraseSettings),
        ("sonnet", SonnetSettings),
        ("multitask", MultitaskSettings),
    ):
        for name, value in each_change(cls):
            changed = with_setting(base, where, name, value)
            if name == "seed":  # the seed is in the name, not the configuration hash
                assert changed.run_name() != base.run_name() and changed.identity_hash() == base.identity_hash()
            else:
                assert changed.identity_hash() != base.identity_hash(), f"{where}.{name} is not in the identity"
            counts[where] = counts.get(where, 0) + 1
    for where, cls in (("output", OutputSettings), ("runtime", RuntimeSettings)):
        for name, value in each_change(cls):
            if name in ("resume", "overwrite", "extend_epochs"):
                continue  # cross-field rules; they are output settings all the same (checked below)
            changed = with_setting(base, where, name, value)
            assert changed.run_name() == base.run_name(), f"{where}.{name} changed the identity"
            counts[where] = counts.get(where, 0) + 1
    resumed = dataclasses.replace(base, output=OutputSettings(resume=True, extend_epochs=2))
    assert resumed.run_name() == base.run_name()
    assert counts["training"] == len(dataclasses.fields(TrainingSettings)) and counts["runtime"] >= 5
    # The checkpoint counts by content, its path not at all; the command as typed does not count.
    moved = dataclasses.replace(base, checkpoint=Checkpoint("/elsewhere/tiny", base.checkpoint.identity))
    assert moved.run_name() == base.run_name()
    other = dataclasses.replace(base, checkpoint=Checkpoint("ckpt/tiny", {"digest": "fedcba9876543210"}))
    assert other.run_name() != base.run_name()
    assert dataclasses.replace(base, argv=("--seed", "1")).run_name() == base.run_name()


def test_a_field_added_to_a_settings_class_is_in_the_identity_without_editing_a_list():
    @dataclass(frozen=True)
    class MoreTraining(TrainingSettings):
        label_smoothing: float = knob(0.0, "a new knob", low=0)

    base = base_spec(training=MoreTraining(lr=1e-4))
    changed = base_spec(training=MoreTraining(lr=1e-4, label_smoothing=0.1))
    assert changed.identity_hash() != base.identity_hash()

    @dataclass(frozen=True)
    class MoreOutput(OutputSettings):
        colour: str = knob("auto", "a new output knob")

    assert base_spec(output=MoreOutput(colour="never")).identity_hash() == base_spec().identity_hash()


def test_spec_json_round_trip_keeps_the_identity():
    from train.tasks import settings_classes

    spec = base_spec()
    again = RunSpec.from_json(json.loads(json.dumps(spec.to_json())), settings_classes())
    assert again == spec and again.run_name() == spec.run_name()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "--lr must be a finite number"),
        ("--warmup", "inf", "--warmup must be a finite number"),
        ("--spike_factor", "nan", "--spike_factor must be a finite number"),
        ("--save_every_minutes", "inf", "--save_every_minutes must be a finite number"),
        ("--attn_pdrop", "nan", "--attn_pdrop must be a finite number"),  # the flag typed, not GPT2Config's
        ("--batch_size", "0", "--batch_size must be >= 1, got 0"),
        ("--lora_r", "0", "--lora_r must be >= 1, got 0"),
        ("--lr", "0", "--lr must be > 0, got 0.0"),  # no "(0, inf]": inf is refused
        ("--attn_pdrop", "1", "--attn_pdrop must be in [0, 1), got 1.0"),
        ("--peft_config", '{"r": NaN}', "--peft_config"),
    ],
)
def test_bad_setting_values_end_in_one_error_line(tiny_ckpt, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as stop:
        entry.parse(
            entry.GENERIC, ["--task", "sst", "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path), flag, value]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "GPT2Config." not in err and "inf]" not in err, err


# ---------------------------------------------------------------- the checkpoint by content


def test_a_copied_or_moved_checkpoint_keeps_its_identity_and_new_weights_do_not(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_VARIANTS_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a" / "tiny"
    make_hf_checkpoint(first, n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=64)
    copy = tmp_path / "b" / "copy"
    shutil.copytree(first, copy)
    monkeypatch.chdir(tmp_path / "a")
    assert checkpoint_identity("tiny") == checkpoint_identity(str(first)) == checkpoint_identity(str(copy))
    assert (tmp_path / "cache" / "file-digests.json").is_file()  # the digests are cached by path, size, mtime
    other = tmp_path / "c" / "other"
    make_hf_checkpoint(other, seed=5, n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=64)
    assert checkpoint_identity(str(other)) != checkpoint_identity(str(first))
    weights = copy / "model.safetensors"
    time.sleep(0.01)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # same size, new bytes and mtime
    assert checkpoint_identity(str(copy)) != checkpoint_identity(str(first))


def test_the_model_path_as_spelled_does_not_change_the_run_folder(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_ckpt[0].parent)
    flags = ["--task", "sst", "--use_lora", "--out_dir", str(tmp_path)]
    relative = entry.planned_run_dir(entry.GENERIC, ["--model", tiny_ckpt[0].name, *flags])
    absolute = entry.planned_run_dir(entry.GENERIC, ["--model", str(tiny_ckpt[0].resolve()), *flags])
    assert relative == absolute


# ---------------------------------------------------------------- one writer


def test_the_lock_refuses_a_second_owner_names_the_pid_and_takes_over_a_dead_ones(tmp_path):
    folder = tmp_path / "run"
    with RunLock(folder):
        assert lock_holder(folder) == str(os.getpid())
        with pytest.raises(RunFolderBusy, match=f"being written by process {os.getpid()}"):
            RunLock(folder).acquire()
    assert lock_holder(folder) is None
    (folder / ".lock").write_text("999999\n")  # left by a process that died: no flock is held on it
    with RunLock(folder):
        assert (folder / ".lock").read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_two_processes_on_one_run_folder_the_second_exits_2_and_the_first_log_is_clean(
    tiny_ckpt, tokenizer_dir, tmp_path
):
    argv = [
        sys.executable, "-m", "train", "--task", "sst", "--model", str(tiny_ckpt[0]), "--tokenizer",
        str(tokenizer_dir), "--out_dir", str(tmp_path), "--wandb", "disabled", "--train_limit", "24",
        "--dev_limit", "8", "--test_limit", "2", "--batch_size", "2", "--epochs", "1", "--use_lora",
    ]  # fmt: skip
    # the first run waits after each of its 12 steps while `gate` exists: it is still going while the second
    # starts and is refused, however long that takes
    gate = tmp_path / "gate"
    gate.touch()
    first = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=plugin_env(GPT2_TEST_STEP_GATE=str(gate)),
    )
    deadline = time.monotonic() + 60
    run_dir = None
    while time.monotonic() < deadline and first.poll() is None:
        folders = [p for p in tmp_path.iterdir() if p.is_dir()]
        if folders and lock_holder(folders[0]):
            run_dir = folders[0]
            break
        time.sleep(0.05)
    assert run_dir is not None, "the first run never held its folder's lock"
    holder = lock_holder(run_dir)
    assert holder == str(first.pid)
    second = run_command(argv)  # (in this process: a second process would prove no more)
    assert second.returncode == 2
    assert f"being written by process {holder}" in second.stderr and "Traceback" not in second.stderr
    assert first.poll() is None and not (run_dir / "metrics.json").exists()  # refused while the first ran
    gate.unlink()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    entries = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in entries if "train/loss" in e]
    assert steps == list(range(1, 13))  # one writer: every step once, in order
    rows = (tmp_path / "runs.tsv").read_text().splitlines()
    assert len(rows) == 2


# ---------------------------------------------------------------- folders written before RunSpec


def legacy_folder(tmp_path: Path, monkeypatch) -> Path:
    """The fixture (a finished LoRA run made by commit b10ef1d) with the checkpoint it names, rebuilt."""
    monkeypatch.setenv("GPT2_VARIANTS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(FIXTURE, tmp_path / "grid")
    monkeypatch.chdir(tmp_path / "grid")
    make_hf_checkpoint(Path("ckpt/tiny"), n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)
    digest = hashlib.sha256(Path("ckpt/tiny/model.safetensors").read_bytes()).hexdigest()
    assert digest.startswith("c81489848a27"), "the rebuilt checkpoint differs from the one the fixture was made with"
    made = min(p.stat().st_mtime for p in (tmp_path / "grid").rglob("config.json")) - 60
    for path in Path("ckpt/tiny").iterdir():  # the checkpoint existed before the run, as it did
        os.utime(path, (made, made))
    return tmp_path / "grid"


LEGACY_COMMAND = [
    "--task", "sst", "--model", "ckpt/tiny", "--use_lora", "--lora_r", "2", "--train_limit", "8", "--dev_limit",
    "4", "--test_limit", "2", "--max_steps", "2", "--batch_size", "4", "--out_dir", "runs", "--wandb", "disabled",
]  # fmt: skip


@pytest.mark.slow
def test_a_legacy_run_folder_is_migrated_found_by_its_command_and_keeps_one_row(tmp_path, monkeypatch, capsys):
    grid = legacy_folder(tmp_path, monkeypatch)
    old = next(p for p in (grid / "runs").iterdir() if p.is_dir())
    spec, _ = entry.parse(entry.GENERIC, LEGACY_COMMAND, inputs=False)
    folder = run_folder(spec)
    assert folder.is_dir() and not old.exists() and folder.name != old.name
    record = json.loads((folder / "config.json").read_text())
    assert record["migrated_from"]["run"] == old.name and record["config_hash"] == spec.identity_hash()
    rows = (grid / "runs" / "runs.tsv").read_text().splitlines()
    assert len(rows) == 2 and folder.name in rows[1] and spec.identity_hash() in rows[1]
    assert migrate_legacy(grid / "runs") == []  # idempotent
    assert entry.main([*LEGACY_COMMAND, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_migration_refuses_a_checkpoint_re_saved_after_the_run(tmp_path, monkeypatch, capsys):
    grid = legacy_folder(tmp_path, monkeypatch)
    old = next(p for p in (grid / "runs").iterdir() if p.is_dir())
    Path("ckpt/tiny/model.safetensors").touch()  # re-saved since: perhaps other weights under the same path
    assert migrate_legacy(grid / "runs") == [] and old.is_dir()
    assert "re-saved after the run" in capsys.readouterr().err


def test_concurrent_migrations_move_each_folder_once(tmp_path, monkeypatch):
    import concurrent.futures

    grid = legacy_folder(tmp_path, monkeypatch) / "runs"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate_legacy(grid), range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    (folder,) = [p for p in grid.iterdir() if p.is_dir()]
    assert json.loads((folder / "config.json").read_text())["run"] == folder.name


def test_planning_renames_nothing(tmp_path, monkeypatch):
    grid = legacy_folder(tmp_path, monkeypatch)
    before = sorted(p.name for p in (grid / "runs").iterdir())
    planned = entry.planned_run_dir(entry.GENERIC, LEGACY_COMMAND)
    assert sorted(p.name for p in (grid / "runs").iterdir()) == before and not planned.exists()


@pytest.mark.slow
def test_an_interrupted_legacy_run_resumes_and_finishes(tmp_path, monkeypatch, tokenizer_dir):
    grid = legacy_folder(tmp_path, monkeypatch)
    old = next(p for p in (grid / "runs").iterdir() if p.is_dir())
    (old / "metrics.json").unlink()  # as if killed after its last checkpoint
    (grid / "runs" / "runs.tsv").unlink()
    assert entry.main([*LEGACY_COMMAND, "--resume", "--tokenizer", str(tokenizer_dir)]) == 0
    rows = (grid / "runs" / "runs.tsv").read_text().splitlines()
    assert len(rows) == 2 and "migrated" not in rows[1]
    folder = next(p for p in (grid / "runs").iterdir() if p.is_dir())
    assert (folder / "metrics.json").is_file() and folder.name != old.name


def test_a_legacy_grid_reports_before_and_after_its_runs_are_migrated(tmp_path, monkeypatch, capsys):
    from experiments import report

    grid = legacy_folder(tmp_path, monkeypatch) / "runs"
    old = next(p for p in grid.iterdir() if p.is_dir())
    old_hash = old.name.rsplit("-", 1)[1]
    (grid / "variants.json").write_text(json.dumps({old_hash: "lora_r2"}))
    assert report.main([str(grid)]) == 0
    before = (grid / "report" / "report.md").read_text()
    assert "| lora_r2 |" in before
    spec, _ = entry.parse(entry.GENERIC, LEGACY_COMMAND, inputs=False)
    run_folder(spec)  # migrates it: new name, new hash in runs.tsv
    assert report.main([str(grid)]) == 0
    after = (grid / "report" / "report.md").read_text()
    assert "| lora_r2 |" in after  # found through the record's migrated_from
    assert after.split("Cost per task")[0] == before.split("Cost per task")[0]


@pytest.mark.slow
def test_train_takes_a_spec_in_process_and_records_it(tiny_ckpt, tokenizer_dir, tmp_path):
    from train.tasks import settings_classes
    from train.trainer.loop import train

    argv = ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir)]
    spec, _ = entry.parse(entry.GENERIC, [*argv, "--out_dir", str(tmp_path), "--use_lora", "--wandb", "disabled"])
    spec = dataclasses.replace(
        spec, training=dataclasses.replace(spec.training, max_steps=2, train_limit=8, dev_limit=4)
    )
    metrics = train(spec)
    assert metrics["steps"] == 2 and metrics["metric"] == "dev_acc"
    record = json.loads((run_folder(spec) / "config.json").read_text())
    assert RunSpec.from_json(record["spec"], settings_classes()) == spec


@pytest.mark.slow
def test_a_resume_keeps_the_runs_own_precision(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir)]
    argv += ["--out_dir", str(tmp_path), "--use_lora", "--wandb", "disabled", "--max_steps", "2", "--train_limit", "8"]
    argv += ["--dev_limit", "4", "--test_limit", "2", "--batch_size", "4", "--precision", "fp32"]
    assert entry.main(argv) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (run_dir / "metrics.json").unlink()  # interrupted after its last checkpoint
    capsys.readouterr()
    assert entry.main([*argv[:-2], "--precision", "bf16", "--resume"]) == 2
    assert "computed in fp32, this resume would compute in bf16; pass --precision fp32" in capsys.readouterr().err


@pytest.mark.slow
def test_a_copied_grid_keeps_its_runs_and_an_extended_run_keeps_one_row(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    first = tmp_path / "grid"
    argv = ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir)]
    argv += ["--use_lora", "--wandb", "disabled", "--train_limit", "8", "--dev_limit", "4", "--test_limit", "2"]
    argv += ["--batch_size", "4", "--epochs", "1"]
    assert entry.main([*argv, "--out_dir", str(first)]) == 0
    moved = tmp_path / "elsewhere" / "grid"
    shutil.copytree(first, moved)  # a grid copied (or moved) to another disk
    capsys.readouterr()
    assert entry.main([*argv, "--out_dir", str(moved), "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out  # found under the same name, not planned again
    assert entry.main([*argv, "--out_dir", str(moved), "--resume", "--extend_epochs", "1"]) == 0
    rows = (moved / "runs.tsv").read_text().splitlines()[1:]
    assert len(rows) == 1 and str(moved) in rows[0]  # its row replaced, not a second one


@pytest.mark.parametrize(
    "flags",
    [
        ["--task", "sst", "--use_lora", "--lora_r", "4", "--lora_targets", "qkv", "mlp_out", "--lr", "3e-4"],
        ["--task", "sonnet", "--use_kan", "--kan_init", "random", "--temperature", "0.7", "--greedy", "--no_bucket"],
        ["--task", "quora", "--paraphrase_head", "linear", "--attn_pdrop", "0", "--use_graph", "--graph_window", "8"],
        ["--task", "cfimdb", "--peft_method", "vera", "--peft_config", '{"r": 4}', "--train_fraction", "0.5"],
        ["--task", "sst", "--fine_tune_mode", "last-linear-layer", "--compile", "--precision", "fp32", "--label", "x"],
    ],
)
def test_a_spec_renders_to_a_command_that_parses_back_to_it(tiny_ckpt, tmp_path, flags):
    from train.cli.parse import render_argv

    argv = [*flags, "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path), "--seed", "3", "--wandb", "disabled"]
    spec, _ = entry.parse(entry.GENERIC, argv, inputs=False)
    again, _ = entry.parse(entry.GENERIC, render_argv(spec), inputs=False)
    assert dataclasses.replace(again, argv=()) == dataclasses.replace(spec, argv=())


# ---------------------------------------------------------------- folders named under an older schema

SPEC2_FIXTURE = REPO / "tests" / "fixtures" / "spec2_216f2d7"  # LEGACY_COMMAND run by commit 216f2d7


def spec2_folder(tmp_path: Path, monkeypatch) -> Path:
    """The fixture's run folder (the current directory is the grid), with its checkpoint rebuilt."""
    monkeypatch.setenv("GPT2_VARIANTS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(SPEC2_FIXTURE, tmp_path / "grid")
    monkeypatch.chdir(tmp_path / "grid")
    make_hf_checkpoint(Path("ckpt/tiny"), n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257)
    (old,) = [p for p in Path("runs").iterdir() if p.is_dir()]
    return old


@pytest.mark.slow
def test_a_run_named_under_an_older_settings_schema_is_renamed_and_resumes(tmp_path, monkeypatch, capsys):
    """Commit 216f2d7 counted every variant's knobs in every identity (a LoRA run's hash held LoRA-XS's
    rank), so each added knob renamed all runs. Its folders are found by their command today: renamed
    once to today's name, with one runs.tsv row, and resumed as finished."""
    from train.run.spec import identity_schema

    old = spec2_folder(tmp_path, monkeypatch)
    spec, _ = entry.parse(entry.GENERIC, LEGACY_COMMAND, inputs=False)
    assert "lora_xs_r" not in spec.identity()["config"]  # a disabled variant's knob: not part of it
    assert spec.run_name() != old.name
    assert entry.main([*LEGACY_COMMAND, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    folder = Path("runs") / spec.run_name()
    assert folder.is_dir() and not old.exists()
    record = json.loads((folder / "config.json").read_text())
    assert record["identity_schema"] == identity_schema() and record["migrated_from"]["run"] == old.name
    assert record["config_hash"] == spec.identity_hash()
    rows = Path("runs/runs.tsv").read_text().splitlines()
    assert len(rows) == 2 and spec.identity_hash() in rows[1]
    assert migrate_legacy(Path("runs")) == []  # stamped with today's schema: never scanned again


def test_adding_a_variant_knob_leaves_other_identities_unchanged(monkeypatch):
    """The identity of a configuration counts only the enabled variants' knobs: registering a new
    variant with knobs of its own leaves a LoRA spec's hash as it was (and changes the schema stamp)."""
    from modules import registry
    from modules.variant import Settings, Variant
    from train.run import spec as spec_module

    before, schema_before = base_spec(config=GPT2Config.from_preset("tiny", use_lora=True)), None
    hash_before = before.identity_hash()
    spec_module.identity_schema.cache_clear()
    schema_before = spec_module.identity_schema()

    @dataclass(frozen=True)
    class ProbeSettings(Settings):
        use_probe: bool = knob(False, "a test-only variant", switch=True)
        probe_width: int = knob(3, "its knob", low=1)

    probe = Variant(
        name="probe", settings=ProbeSettings, enabled=lambda c: c.use_probe, attach=lambda m, c: None,
        tag=lambda c: "probe", namespace=".probe",
    )  # fmt: skip
    monkeypatch.setitem(registry.VARIANTS, "probe", probe)
    spec_module.identity_schema.cache_clear()
    try:
        after = base_spec(config=GPT2Config.from_preset("tiny", use_lora=True))
        assert "probe_width" in after.config.to_dict() and "probe_width" not in after.identity()["config"]
        assert after.identity_hash() == hash_before
        assert spec_module.identity_schema() != schema_before  # old folders get checked once
        with_probe = base_spec(config=GPT2Config.from_preset("tiny", use_lora=True, use_probe=True))
        assert with_probe.identity()["config"]["probe_width"] == 3
        assert with_probe.identity_hash() != hash_before
    finally:
        spec_module.identity_schema.cache_clear()


def test_a_migration_killed_between_rename_and_record_is_finished_by_the_next(tmp_path, monkeypatch):
    """The folder already has today's name but its record and runs.tsv row still the old ones (a kill
    between os.rename and the record's rewrite): the next pass rewrites both, not just the stamp."""
    from train.run.spec import identity_schema

    old = spec2_folder(tmp_path, monkeypatch)
    spec, _ = entry.parse(entry.GENERIC, LEGACY_COMMAND, inputs=False)
    os.rename(old, Path("runs") / spec.run_name())  # ... and the process died here
    migrate_legacy(Path("runs"))
    record = json.loads((Path("runs") / spec.run_name() / "config.json").read_text())
    assert record["config_hash"] == spec.identity_hash() and record["run"] == spec.run_name()
    assert record["identity_schema"] == identity_schema()
    rows = Path("runs/runs.tsv").read_text().splitlines()
    assert len(rows) == 2 and spec.identity_hash() in rows[1] and spec.run_name() in rows[1]
