"""Issue 11: a run's whole life. Validation before any work, resume semantics (settings checked,
finished runs not re-run, one runs.tsv row per run folder), dead folders, the divergence guard,
wandb's offline fallback, the data cache, and the smaller console / file items. The signal tests
(subprocesses) are in test_signals.py."""

from __future__ import annotations

import csv
import json
import socket
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA_DIR, REPO, run_command, run_paths, serve_folder
from train import multitask, paraphrase, sentiment, sonnet
from train.cli import entry, evaluate

QUICK = ["--train_limit", "16", "--dev_limit", "4", "--test_limit", "2", "--batch_size", "4", "--wandb", "disabled"]


def sst(tiny_ckpt, tokenizer_dir, out, *flags):
    return ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, out), *QUICK, *flags]


def only_run(out):
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def tsv_rows(out):
    with open(out / "runs.tsv") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def logged_steps(run_dir):
    return [
        json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines() if '"train/loss"' in line
    ]


# ---- 1. every invalid numeric value: exit 2, one line, nothing loaded ------------------------------

TRAINING_BAD = {
    "--epochs": ["0", "-1"],
    "--max_steps": ["0"],
    "--batch_size": ["0"],
    "--eval_batch_size": ["0"],
    "--grad_accum": ["0"],
    "--train_limit": ["0", "-3"],
    "--dev_limit": ["0"],
    "--test_limit": ["0"],
    "--max_length": ["0"],
    "--lr": ["0", "-1e-4"],
    "--weight_decay": ["-0.1"],
    "--warmup": ["-1"],
    "--max_grad_norm": ["0"],
    "--eval_every": ["-1"],
    "--save_every": ["-5"],
    "--save_every_minutes": ["-1"],
    "--patience": ["-1"],
    "--log_every": ["-1"],
    "--spike_factor": ["0.5", "-2"],
    "--extend_epochs": ["0"],
    "--epochs ": ["x"],  # not a number at all (argparse's own message)
}
SONNET_BAD = {"--temperature": ["0", "-1"], "--top_p": ["0", "1.5"], "--top_k": ["0"], "--max_new_tokens": ["0"]}
ENTRY_POINTS = {
    "train": (entry.main, ["--task", "sst"], {}),
    "train.sentiment": (sentiment.main, ["--dataset", "sst"], {}),
    "train.paraphrase": (paraphrase.main, [], {}),
    "train.sonnet": (sonnet.main, [], SONNET_BAD),
    "train.multitask": (multitask.main, [], {**SONNET_BAD, "--sampling_temperature": ["0"]}),
}
CASES = [
    (name, flag.strip(), value)
    for name, (_, _, extra) in ENTRY_POINTS.items()
    for flag, values in {**TRAINING_BAD, **extra}.items()
    for value in values
]
EVALUATE_CASES = [
    ("--batch_size", "0"),
    ("--dev_limit", "0"),
    ("--test_limit", "-1"),
    ("--max_length", "0"),
    *((flag, value) for flag, values in SONNET_BAD.items() for value in values),
    ("--device", "tpu"),
    ("--device", "cuda:99"),
]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Reading weights, the tokenizer or data fails the test: validation must come first."""
    import model.loading
    import model.tokenizer

    def forbidden(*args, **kwargs):
        raise AssertionError("something was loaded before the flags were validated")

    monkeypatch.setattr(model.loading, "read_weights", forbidden)
    monkeypatch.setattr(model.tokenizer, "load_tokenizer", forbidden)
    monkeypatch.setattr("task_data.common.read_tsv", forbidden)


def _exit_2_quickly(main, argv, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 2, err  # the message + the --help hint
    assert seconds < 5, seconds
    return err


@pytest.mark.parametrize("name, flag, value", CASES, ids=[f"{n}{f}={v}" for n, f, v in CASES])
def test_every_invalid_numeric_flag_exits_2_before_anything_loads(
    name, flag, value, tiny_ckpt, tmp_path, nothing_loads, capsys
):
    main, selection, _ = ENTRY_POINTS[name]
    argv = [*selection, "--model", str(tiny_ckpt[0]), "--out_dir", str(tmp_path), flag, value]
    if flag == "--extend_epochs":
        argv.append("--resume")
    err = _exit_2_quickly(main, argv, capsys)
    assert flag in err or "invalid" in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flag, value", EVALUATE_CASES)
def test_evaluate_invalid_values_exit_2(flag, value, tiny_ckpt, tmp_path, nothing_loads, capsys):
    err = _exit_2_quickly(
        evaluate.main, ["--task", "sonnet", "--model", str(tiny_ckpt[0]), "--out_dir", "x", flag, value], capsys
    )
    assert flag in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "--device 'tpu' unknown"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--device", "cpu:1"], "unknown"),
        (["--resume", "--overwrite"], "contradict"),
    ],
)
def test_device_and_mode_errors(flags, message, tiny_ckpt, tmp_path, nothing_loads, capsys):
    err = _exit_2_quickly(sentiment.main, ["--dataset", "sst", "--model", str(tiny_ckpt[0]), *flags], capsys)
    assert message in err


# ---- 2/3. resume semantics and dead folders --------------------------------------------------------


@pytest.mark.slow
def test_resume_of_a_finished_run_does_nothing_and_runs_tsv_keeps_one_row(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path, "--max_steps", "3")
    assert sentiment.main(argv) == 0
    run_dir = only_run(tmp_path)
    log_before = (run_dir / "log.jsonl").read_text()
    capsys.readouterr()
    assert sentiment.main([*argv, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out
    assert len(tsv_rows(tmp_path)) == 1
    assert (run_dir / "log.jsonl").read_text() == log_before
    # a fresh start of the same settings is refused, naming the way out
    assert sentiment.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "pass --overwrite to train it again" in err
    # --overwrite trains it again: still one row, one log of steps 1..3
    assert sentiment.main([*argv, "--overwrite"]) == 0
    assert len(tsv_rows(tmp_path)) == 1 and logged_steps(run_dir) == [1, 2, 3]


@pytest.mark.slow
def test_resume_with_changed_settings_names_each_difference(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path, "--max_steps", "2", "--use_lora")
    assert sentiment.main(argv) == 0
    capsys.readouterr()
    changed = [*argv, "--resume", "--epochs", "3", "--train_limit", "8", "--lora_r", "4"]
    assert sentiment.main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --resume: no run with these settings")
    for difference in (
        "--epochs: 10 in the run, 3 now",
        "--train_limit: 16 in the run, 8 now",
        "--lora_r: 8 in the run",
    ):
        assert difference in err, err
    assert len(tsv_rows(tmp_path)) == 1


@pytest.mark.slow
def test_resume_of_a_missing_run_and_corrupt_pointer(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path, "--max_steps", "4", "--save_every", "1")
    assert sentiment.main([*argv, "--resume"]) == 2
    assert "no run" in capsys.readouterr().err
    assert sentiment.main(argv) == 0
    run_dir = only_run(tmp_path)
    (run_dir / "metrics.json").unlink()  # as if killed after its last checkpoint
    (run_dir / "checkpoints" / "last.json").write_text("{not json")
    capsys.readouterr()
    assert sentiment.main([*argv, "--resume"]) == 0  # the folders are the record: the newest complete one
    err = capsys.readouterr().err
    assert "last.json is corrupt" in err and "using the newest complete last checkpoint" in err, err
    # with no complete folder left, a corrupt pointer is one error line
    (run_dir / "metrics.json").unlink()
    for folder in (run_dir / "checkpoints").glob("last-*"):
        (folder / "optimizer.safetensors").unlink()
    (run_dir / "checkpoints" / "last.json").write_text("{not json")
    assert sentiment.main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "last.json is corrupt" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_dead_folder_is_refused_then_restarted_cleanly(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path, "--max_steps", "3")
    assert sentiment.main(argv) == 0
    run_dir = only_run(tmp_path)
    # make it a run that died before its first checkpoint: config.json and a log only
    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "predictions")
    (run_dir / "metrics.json").unlink()
    (tmp_path / "runs.tsv").unlink()
    capsys.readouterr()
    assert sentiment.main(argv) == 2
    assert "stopped at step 3 before its first checkpoint" in capsys.readouterr().err
    assert logged_steps(run_dir) == [1, 2, 3]
    assert sentiment.main([*argv, "--resume"]) == 0  # restarts from step 0 in a cleared folder
    assert logged_steps(run_dir) == [1, 2, 3] and len(tsv_rows(tmp_path)) == 1


@pytest.mark.slow
def test_resume_continues_without_repeating_log_steps_and_extend_epochs(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path, "--epochs", "1", "--save_every", "1", "--use_lora")
    assert sentiment.main(argv) == 0  # 16 examples / 4 = 4 steps
    run_dir = only_run(tmp_path)
    assert logged_steps(run_dir) == [1, 2, 3, 4]
    lrs = {
        json.loads(x)["step"]: json.loads(x)["train/lr"]
        for x in (run_dir / "log.jsonl").read_text().splitlines()
        if "train/lr" in x
    }
    assert lrs[4] == 0.0  # linear decay finished
    capsys.readouterr()
    assert sentiment.main([*argv, "--resume", "--extend_epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert "re-planned over 8 steps" in err and "lr goes from 0 to 0.0001" in err
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6, 7, 8]
    rows = tsv_rows(tmp_path)
    assert len(rows) == 1 and rows[0]["steps"] == "8"
    record = json.loads((run_dir / "config.json").read_text())
    assert record["extra_epochs"] == 1
    # the added steps follow the re-planned schedule: 2e-4 * (1 - step/8)
    lrs = {
        json.loads(x)["step"]: json.loads(x)["train/lr"]
        for x in (run_dir / "log.jsonl").read_text().splitlines()
        if "train/lr" in x
    }
    assert lrs[5] == pytest.approx(2e-4 * (1 - 5 / 8)) and lrs[8] == 0.0
    with pytest.raises(SystemExit) as refused:  # needs --resume: refused with the flags, before anything loads
        sentiment.main([*argv, "--extend_epochs", "1"])
    assert refused.value.code == 2 and "--extend_epochs N extends an existing run" in capsys.readouterr().err


# ---- 4. the divergence guard -----------------------------------------------------------------------


@pytest.mark.slow
def test_spike_is_not_checkpointed_and_resume_says_the_run_diverged(
    tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    from train.tasks.classification import ClassificationTask

    original = ClassificationTask.loss_on  # the training step's loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):  # step 8: a finite spike (below the blow-up bound); step 10: NaN
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * {8: 30.0, 10: float("nan")}.get(calls["n"], 1.0)

    monkeypatch.setattr(ClassificationTask, "loss_on", poisoned)
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path, "--train_limit", "48", "--save_every", "1", "--epochs", "1")
    assert sentiment.main(argv) == 3
    err = capsys.readouterr().err
    run_dir = only_run(tmp_path)
    # checkpoint of step 7 (whose weights gave the spike at step 8) is not kept; step 8's weights are
    # judged by step 9 (healthy again here), step 9's by the NaN at step 10
    lines = err.splitlines()
    assert any(line.startswith("step 8: loss spike") and "checkpoint of step 7" in line for line in lines), err
    assert any(
        line.startswith("error: training diverged at step 10 on task sst: non-finite loss (nan)") for line in lines
    )
    pointer = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert pointer["step"] == 8
    info = json.loads((run_dir / "diverged.json").read_text())
    assert info["step"] == 10 and info["loss"] == "nan"
    monkeypatch.setattr(ClassificationTask, "loss_on", original)
    assert sentiment.main([*argv, "--resume"]) == 0
    assert "this run diverged before (non-finite loss (nan) at step 10" in capsys.readouterr().err


# ---- 5. wandb ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_online_without_login_falls_back_to_offline(tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch, capsys):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    summaries = []
    from train.run import log as runs

    monkeypatch.setattr(runs.RunLogger, "summary", lambda self, values: summaries.append(values))
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path / "out", "--max_steps", "2", "--wandb_group", "grid-x")
    argv[argv.index("disabled")] = "online"
    assert sentiment.main(argv) == 0
    err = capsys.readouterr().err
    run_dir = only_run(tmp_path / "out")
    assert "logging offline instead" in err and f"wandb sync {run_dir / 'wandb'}" in err
    assert list((run_dir / "wandb").glob("offline-run-*"))
    (summary,) = summaries
    for key in ("best/step", "train_seconds", "peak_memory_mb", "trainable_params", "best/selection_score"):
        assert summary[key] is not None, key
    record = json.loads((run_dir / "config.json").read_text())
    assert record["grid"] == "grid-x"


# ---- 7. data: fetched into the cache when missing, one message offline ------------------------------


@pytest.fixture
def data_server():
    with serve_folder(DATA_DIR) as url:
        yield url


@pytest.mark.slow
def test_missing_data_is_fetched_into_the_cache(tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch, data_server, capsys):
    monkeypatch.delenv("GPT2_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2_DATA_URL", data_server)
    monkeypatch.chdir(tmp_path)  # no ./data/cs224n here
    argv = ["--dataset", "sst", "--model", str(tiny_ckpt[0]), "--tokenizer", str(tokenizer_dir), "--out_dir", "runs"]
    assert sentiment.main([*argv, *QUICK, "--max_steps", "1"]) == 0
    cached = tmp_path / "cache" / "gpt2-variants" / "cs224n"
    assert "fetching 3 task data file(s) into " + str(cached) in capsys.readouterr().err
    assert sorted(p.name for p in cached.iterdir()) == [
        "ids-sst-dev.csv",
        "ids-sst-test-student.csv",
        "ids-sst-train.csv",
    ]


def test_offline_without_data_is_one_message(tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a port nothing listens on: the fetch fails at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("GPT2_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2_DATA_URL", f"http://127.0.0.1:{port}/")
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "sst", "--model", str(tiny_ckpt[0]), "--tokenizer", str(tokenizer_dir), *QUICK]
    with pytest.raises(SystemExit) as exit_info:
        sentiment.main(argv)
    assert exit_info.value.code == 2
    fetching, error, hint = capsys.readouterr().err.splitlines()
    assert fetching.startswith("fetching 3 task data file(s)") and hint.startswith("(run with --help")
    assert error.startswith("error: ") and "fetching them failed" in error
    assert "python scripts/download_data.py --out" in error


def test_offline_hub_model_fails_once_before_anything_else(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    err = _exit_2_quickly(sentiment.main, ["--dataset", "sst", "--model", "gpt2", "--out_dir", str(tmp_path)], capsys)
    assert "could not load 'gpt2'" in err and "fetching it from the Hugging Face hub failed" in err


# ---- 8. smaller items ---------------------------------------------------------------------------------


def test_short_row_reports_its_real_field_count(tmp_path):
    from task_data.common import DataError, read_tsv

    path = tmp_path / "bad.csv"
    path.write_text("id\tsentence\tsentiment\textra\na\tgood\t1\tx\nb\tbad\n")
    with pytest.raises(DataError, match=r"bad.csv:3: wrong number of fields \(2 for 4 columns\)"):
        read_tsv(path, ("sentence",), "sentiment", int)


def test_sonnets_cut_mid_word_warn(tmp_path, caplog):
    from task_data.sonnets import read_sonnet_file

    text = (DATA_DIR / "sonnets.txt").read_text()
    (tmp_path / "whole.txt").write_text(text)
    (tmp_path / "cut.txt").write_text(text[: text.rindex("proceeds") + 4])
    with caplog.at_level("WARNING"):
        read_sonnet_file(tmp_path / "whole.txt")
        assert not caplog.records
        read_sonnet_file(tmp_path / "cut.txt")
    assert "think proc') without punctuation; the file may be cut short" in caplog.text


def test_quora_warning_names_no_missing_option(caplog):
    from task_data.paraphrase import load_paraphrase

    with caplog.at_level("WARNING"):
        load_paraphrase("train", DATA_DIR)
    assert "empty label" in caplog.text and "bad_rows" not in caplog.text


@pytest.mark.slow
def test_multitask_metrics_paths_and_best_epoch(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = ["--tasks", "sst", "quora", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *QUICK, "--epochs", "2"]
    assert multitask.main(argv) == 0
    run_dir = only_run(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for task, values in metrics["tasks"].items():
        for split, path in values["predictions"].items():
            assert path.startswith("predictions/") and (run_dir / path).is_file(), (task, split, path)
    # 32 examples / 4 = 8 steps per epoch: the best step's epoch is step / 8, as every other line counts it
    out = capsys.readouterr().out
    best = metrics["best_step"]
    assert f"at step {best} (epoch {best / 8:.2f})" in out


def test_dry_run_writes_nothing(tmp_path, tokenizer_dir, capsys):
    from experiments import ablate

    out = tmp_path / "grid"
    argv = [
        str(REPO / "experiments/presets/smoke.toml"),
        "--out_dir",
        str(out),
        "--dry_run",
        "--tokenizer",
        str(tokenizer_dir),
    ]
    assert ablate.main(argv) == 0
    assert not out.exists()
    assert " new " in capsys.readouterr().out


def test_ablate_checks_data_before_any_run(tmp_path, tokenizer_dir, capsys):
    from experiments import ablate

    out = tmp_path / "grid"
    argv = [str(REPO / "experiments/presets/smoke.toml"), "--out_dir", str(out), "--data_dir", str(tmp_path / "empty")]
    with pytest.raises(SystemExit) as exit_info:
        ablate.main([*argv, "--tokenizer", str(tokenizer_dir)])
    assert exit_info.value.code == 2
    assert "lacks ids-" in capsys.readouterr().err and not (out / "logs").exists()


def test_unreachable_hub_is_probed_once_and_fails_fast(tmp_path, monkeypatch, capsys):
    from model import hub

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    probes = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: probes.append(a) or real(*a, **k))
    hub.hub_unreachable.cache_clear()
    try:
        err = _exit_2_quickly(
            sentiment.main, ["--dataset", "sst", "--model", "gpt2", "--out_dir", str(tmp_path)], capsys
        )
        assert f"127.0.0.1:{port} is unreachable" in err and "config.json is not cached" in err
        from model.loading import resolve_weights_file

        with pytest.raises(Exception, match="is unreachable"):  # a second component: no new probe, no retries
            resolve_weights_file("gpt2")
        assert len(probes) == 1
    finally:
        hub.hub_unreachable.cache_clear()


def test_help_shows_every_default_and_the_real_program_name():
    import sys

    from train.cli.parse import build_parser
    from train.tasks import TASKS

    parser = build_parser("x")
    entry._add_multitask(parser, True)
    for task in TASKS.values():
        task.add_flags(parser)
    missing = [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings and a.dest != "help" and "default" not in (a.help or "")
    ]
    assert missing == []
    usage = run_command([sys.executable, "-m", "train", "--help"]).stdout
    assert usage.startswith("usage: python -m train [-h]")


@pytest.mark.slow
def test_off_a_terminal_progress_is_plain_lines_with_dev_metrics(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    argv = sst(tiny_ckpt, tokenizer_dir, tmp_path, "--max_steps", "4", "--log_every", "2", "--eval_every", "2")
    assert sentiment.main(argv) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err  # no progress bar when stderr is not a terminal
    steps = [line.split(" loss ")[0] for line in lines if "/4 (epoch" in line]
    assert steps == ["step 2/4 (epoch 0.50)", "step 4/4 (epoch 1.00)"]  # the same epoch count as the dev lines
    dev = [line for line in lines if "dev_acc" in line]
    assert len(dev) == 2 and dev[0].startswith("step 2 (epoch 0.50): sst dev_acc ") and "selection" in dev[0]


@pytest.mark.parametrize("precision", ["auto", "bf16"])
@pytest.mark.slow
def test_evaluate_samples_sonnets_with_the_runs_seed_and_precision(tiny_ckpt, tokenizer_dir, tmp_path, precision):
    # bf16: a run that trained (and scored dev) under bf16 autocast is evaluated under it too; found on an
    # H100, where --precision auto is bf16 and evaluate.py used to score in fp32 (another chrF)
    limits = ["--dev_limit", "3", "--test_limit", "1", "--max_new_tokens", "8"]
    argv = [*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "runs"), *limits, "--train_limit", "4"]
    flags = ["--max_steps", "1", "--seed", "5", "--wandb", "disabled", "--precision", precision]
    assert sonnet.main([*argv, *flags]) == 0
    run_dir = only_run(tmp_path / "runs")
    trained = json.loads((run_dir / "metrics.json").read_text())["dev_chrf"]
    out = tmp_path / "eval"
    assert evaluate.main(["--task", "sonnet", *run_paths(run_dir, tokenizer_dir, out), *limits]) == 0
    assert json.loads((out / "metrics.json").read_text())["dev_chrf"] == trained
    assert evaluate.main(["--task", "sonnet", *run_paths(run_dir, tokenizer_dir, out), *limits, "--seed", "0"]) == 0
    assert json.loads((out / "metrics.json").read_text())["dev_chrf"] != trained  # the seed matters: the check can fail


def test_test_split_is_predicted_once_at_the_end_from_the_best_checkpoint(
    tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch
):
    """Dev is scored at every evaluation; the test split once, after training, with the best weights
    (here step 2's: the selection score is made to fall after the first evaluation)."""
    from train.tasks.classification import ClassificationTask
    from train.tasks.predictions import read_classification
    from train.trainer import loop

    scores = iter([0.9, 0.1, 0.2, 0.3, 0.4])
    monkeypatch.setattr(loop, "selection_score", lambda metrics: next(scores))
    calls, original = [], ClassificationTask.test_predictions

    def counted(self, model, *args, **kwargs):
        calls.append(model.transformer.wte.weight.detach().clone())
        return original(self, model, *args, **kwargs)

    monkeypatch.setattr(ClassificationTask, "test_predictions", counted)
    flags = ("--max_steps", "10", "--eval_every", "2", "--lr", "3e-2", "--test_limit", "6")
    assert sentiment.main(sst(tiny_ckpt, tokenizer_dir, tmp_path / "runs", *flags)) == 0
    run_dir = only_run(tmp_path / "runs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_step"] == 2 and metrics["steps"] == 10 and metrics["test_predictions_step"] == 2
    assert len(calls) == 1  # five evaluations, one test prediction

    def saved_wte(kind):
        folder = next((run_dir / "checkpoints").glob(f"{kind}-*"))
        return next(v for k, v in load_file(str(folder / "trainable.safetensors")).items() if k.endswith("wte.weight"))

    assert torch.equal(calls[0], saved_wte("best"))  # the best checkpoint's weights ...
    assert not torch.equal(calls[0], saved_wte("last"))  # ... not the last step's
    test = read_classification(run_dir / metrics["predictions"]["test"])
    assert len(test) == 6 and metrics["eval_seconds"] > 0 and metrics["test_seconds"] >= 0
    (row,) = tsv_rows(tmp_path / "runs")  # the timings are bookkeeping, not dev metrics
    assert set(json.loads(row["dev_metrics"])["sst"]) == {"dev_acc", "dev_f1", "dev_majority_acc"}
    # train.evaluate on the run folder (its best checkpoint) predicts the same test labels
    paths = run_paths(run_dir, tokenizer_dir, tmp_path / "eval")
    assert evaluate.main(["--task", "sst", *paths, "--test_limit", "6"]) == 0
    assert read_classification(tmp_path / "eval" / "sst-test-output.csv") == test


def test_a_crash_in_the_test_prediction_resumes_into_it_not_into_more_training(
    tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch
):
    """Patience stops the run at step 4 of 10; the test prediction then crashes. --resume predicts the
    test split and finishes at step 4: it does not train on (the stop is in the checkpoint)."""
    from train.tasks.classification import ClassificationTask
    from train.trainer import loop

    scores = iter([0.9, 0.1, 0.2, 0.3])
    monkeypatch.setattr(loop, "selection_score", lambda metrics: next(scores))
    original = ClassificationTask.test_predictions

    def crash(self, *args, **kwargs):
        raise RuntimeError("out of memory while predicting the test split")

    monkeypatch.setattr(ClassificationTask, "test_predictions", crash)
    flags = ("--max_steps", "10", "--eval_every", "2", "--patience", "1", "--lr", "3e-2")
    with pytest.raises(RuntimeError, match="out of memory"):
        sentiment.main(sst(tiny_ckpt, tokenizer_dir, tmp_path / "runs", *flags))
    run_dir = only_run(tmp_path / "runs")
    assert not (run_dir / "metrics.json").exists() and max(logged_steps(run_dir)) == 4
    monkeypatch.setattr(ClassificationTask, "test_predictions", original)
    assert sentiment.main(sst(tiny_ckpt, tokenizer_dir, tmp_path / "runs", *flags, "--resume")) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["best_step"] == 2 and metrics["test_predictions_step"] == 2
    assert max(logged_steps(run_dir)) == 4  # no step after the stop was trained


def test_a_signal_during_work_after_the_last_checkpoint_stops_it_at_once():
    """The test prediction runs after the last checkpoint: a SIGTERM there stops it at once (a resume
    redoes it) instead of waiting for the whole split, while one before it lets the run finish."""
    import os
    import signal

    from train.trainer.lifecycle import Interrupted, StopSignals

    with StopSignals() as signals, pytest.raises(Interrupted) as raised:
        with signals.at_once(lambda signum: f"stopped by {signum}"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises inside this sleep
    assert raised.value.exit_status == 143 and str(raised.value) == f"stopped by {signal.SIGTERM}"
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        with signals.at_once(lambda signum: "stopped"):
            pass  # a signal received before the work began does not stop it
    assert signals.received == signal.SIGTERM
