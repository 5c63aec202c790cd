"""The evaluation entry point end to end on a tiny random checkpoint, for every task; the metrics it
writes equal metrics recomputed from its own prediction files and the gold files."""

from __future__ import annotations

import json

import pytest

from task_data.paraphrase import load_paraphrase
from task_data.sentiment import load_sentiment
from task_data.sonnets import load_sonnets
from tests.conftest import DATA_DIR, run_paths
from train.cli import evaluate
from train.tasks.metrics import accuracy, chrf, macro_f1
from train.tasks.predictions import read_classification, read_sonnets

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` skips this file


def test_all_tasks_end_to_end(tiny_ckpt, tokenizer_dir, tmp_path):
    out = tmp_path / "eval"
    code = evaluate.main(
        [
            "--task",
            "all",
            *run_paths(tiny_ckpt[0], tokenizer_dir, out),
            "--dev_limit",
            "40",
            "--test_limit",
            "10",
            "--max_new_tokens",
            "24",
            "--batch_size",
            "8",
        ]
    )
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary) == {"sst", "cfimdb", "quora", "sonnet"}
    gold_sets = {
        "sst": load_sentiment("sst", "dev", DATA_DIR),
        "cfimdb": load_sentiment("cfimdb", "dev", DATA_DIR),
        "quora": load_paraphrase("dev", DATA_DIR),
    }
    for task, gold in gold_sets.items():
        metrics = json.loads((out / task / "metrics.json").read_text())
        assert metrics == summary[task]
        dev = read_classification(out / task / metrics["predictions"]["dev"])
        test = read_classification(out / task / metrics["predictions"]["test"])
        assert len(dev) == 40 and len(test) == 10
        gold = gold[:40]
        predicted = [dev[e.id] for e in gold]
        assert metrics["dev_acc"] == accuracy([e.label for e in gold], predicted)
        assert metrics["dev_f1"] == macro_f1([e.label for e in gold], predicted, range(5 if task == "sst" else 2))
        header = (out / task / metrics["predictions"]["dev"]).read_text().splitlines()[0]
        assert header.startswith("id \t Predicted_")
    sonnet = json.loads((out / "sonnet" / "metrics.json").read_text())
    generated = read_sonnets(out / "sonnet" / sonnet["predictions"]["dev"])
    assert len(generated) == 12 and len(read_sonnets(out / "sonnet" / sonnet["predictions"]["test"])) == 10
    gold = dict(load_sonnets("dev_gold", DATA_DIR))
    prompts = dict(load_sonnets("dev_prompts", DATA_DIR))
    for number, body in generated:
        assert body.startswith(prompts[number])  # the prompt is kept, the continuation follows
    assert abs(sonnet["dev_chrf"] - chrf([b for _, b in generated], [gold[n] for n, _ in generated])) <= 1e-9
    text = (out / "sonnet" / sonnet["predictions"]["dev"]).read_text()
    assert text.startswith("--Generated Sonnets--")


def test_single_task_writes_flat_folder(tiny_ckpt, tokenizer_dir, tmp_path):
    code = evaluate.main(
        [
            "--task",
            "quora",
            *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path),
            "--dev_limit",
            "16",
            "--test_limit",
            "4",
            "--paraphrase_head",
            "linear",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"dev_acc", "dev_f1", "predictions"} <= set(metrics)
    assert (tmp_path / "quora-test-output.csv").is_file()


def test_evaluating_a_run_folder_reproduces_its_metrics(tiny_ckpt, tokenizer_dir, tmp_path):
    from train import sentiment

    runs = tmp_path / "runs"
    assert (
        sentiment.main(
            [
                "--dataset",
                "sst",
                *run_paths(tiny_ckpt[0], tokenizer_dir, runs),
                "--train_limit",
                "32",
                "--dev_limit",
                "24",
                "--test_limit",
                "4",
                "--batch_size",
                "8",
                "--epochs",
                "3",
                "--lr",
                "1e-2",
                "--use_lora",
                "--wandb",
                "disabled",
            ]
        )
        == 0
    )
    run_dir = next(p for p in runs.iterdir() if p.is_dir())
    trained = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [
                "--task",
                "sst",
                *run_paths(run_dir, tokenizer_dir, out),
                "--dev_limit",
                "24",
                "--test_limit",
                "4",
            ]
        )
        == 0
    )
    again = json.loads((out / "metrics.json").read_text())
    assert again["dev_acc"] == trained["dev_acc"] and again["dev_f1"] == trained["dev_f1"]
    assert (out / "sst-dev-output.csv").read_text() == (run_dir / "predictions" / "sst-dev-output.csv").read_text()


def test_run_folder_without_best_checkpoint_is_refused(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    code = evaluate.main(
        [
            "--task",
            "sst",
            *run_paths(run, tokenizer_dir, tmp_path / "out"),
        ]
    )
    assert code == 2 and "without a best checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train.evaluate", "experiments.cka"])
def test_a_missing_run_is_named_before_the_data_are_looked_for(command, tmp_path, monkeypatch, capsys):
    """It used to surface as "fetching the task data failed" when no data folder was set."""
    import importlib

    monkeypatch.delenv("GPT2_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("GPT2_DATA_URL", "http://127.0.0.1:9/")  # nothing listens: a fetch would fail
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    argv = (
        ["--task", "sst", "--model", "runs/nope", "--out_dir", "out"]
        if command == "train.evaluate"
        else ["runs/nope", "--task", "sst", "--out", "out"]
    )
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(command).main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "could not load 'runs/nope'" in err and "task data" not in err, err


def test_evaluate_picks_its_device_as_training_does(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    from train.trainer.distributed import auto_device

    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert "(default: auto)" in " ".join(capsys.readouterr().out.split())
    args = evaluate.parse_args(["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path)])
    assert args.device == auto_device()  # resolved as training resolves it (cuda > mps > cpu)
