"""Cross-task transfer (train/cli/transfer.py): the label map on planted logits, the stratified subset,
a tiny SST -> CFIMDB run end to end, its starting weights, its from-scratch control and its refusals."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from model import GPT2LMHeadModel, load_tokenizer
from model.heads import LastTokenClassifier
from task_data.common import DataError, stratified_fraction
from tests.conftest import DATA_DIR, TEST_DEVICE, run_paths
from train.base.settings import TrainingSettings
from train.cli import entry, transfer
from train.run import checkpoint as ckpt
from train.run.trained import load_model
from train.tasks.sentiment import CFIMDB

# ---------------------------------------------------------------- the label map


def test_sst_to_cfimdb_map_splits_neutral_evenly_on_planted_logits():
    # probabilities planted through their logs; the source argmax (neutral, class 2) is never the answer
    planted = torch.tensor(
        [
            [0.30, 0.00, 0.50, 0.20, 0.00],  # neg 0.30 + 0.25 = 0.55 > pos 0.20 + 0.25 -> negative
            [0.10, 0.10, 0.40, 0.10, 0.30],  # neg 0.20 + 0.20 = 0.40 < pos 0.40 + 0.20 -> positive
            [0.00, 0.45, 0.10, 0.45, 0.00],  # a tie broken by the neutral half only: 0.5 / 0.5
            [0.05, 0.05, 0.00, 0.00, 0.90],
        ]
    )
    mapped = transfer.map_to_target(planted.clamp_min(1e-12).log(), transfer.LABEL_MAPS[("sst", "cfimdb")])
    expected_negative = planted[:, 0] + planted[:, 1] + planted[:, 2] / 2
    torch.testing.assert_close(mapped[:, 0], expected_negative, atol=1e-6, rtol=0)
    torch.testing.assert_close(mapped.sum(-1), torch.ones(4), atol=1e-6, rtol=0)
    assert mapped[[0, 1, 3]].argmax(-1).tolist() == [0, 1, 1]
    assert abs(mapped[2, 0].item() - 0.5) < 1e-6


def test_label_map_refuses_a_head_of_another_size():
    with pytest.raises(ValueError, match="3 outputs"):
        transfer.map_to_target(torch.zeros(2, 3), transfer.LABEL_MAPS[("sst", "cfimdb")])


# ---------------------------------------------------------------- the stratified subset


def test_stratified_fraction_is_seeded_proportional_and_refuses_a_missing_label():
    labels = [0] * 300 + [1] * 100 + [2] * 50
    first = stratified_fraction(labels, 0.1, seed=3)
    assert first == stratified_fraction(labels, 0.1, seed=3) == sorted(first)
    assert first != stratified_fraction(labels, 0.1, seed=4)
    counts = [sum(1 for i in first if labels[i] == label) for label in range(3)]
    assert counts == [30, 10, 5]
    with pytest.raises(DataError, match=r"label\(s\) 1 \(100 there\), 2 \(50 there\)"):
        stratified_fraction(labels, 0.005, seed=3)  # 300 -> 2, 100 -> 0 (round half to even), 50 -> 0
    with pytest.raises(DataError, match="in \\(0, 1\\]"):
        stratified_fraction(labels, 0.0, seed=3)


# ---------------------------------------------------------------- end to end


def _source_run(tmp_path, tiny_ckpt, tokenizer_dir, task="sst") -> tuple:
    out = tmp_path / "runs"
    flags = ["--task", task, *run_paths(tiny_ckpt[0], tokenizer_dir, out), "--use_lora", "--lora_r", "4"]
    flags += ["--train_limit", "48", "--dev_limit", "16", "--test_limit", "2", "--epochs", "2", "--seed", "5"]
    flags += ["--batch_size", "8", "--lr", "5e-3", "--wandb", "disabled", "--wandb_group", "mygrid"]
    assert entry.main(flags) == 0
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name.startswith(f"{task}-")]
    return out, run_dir


def _transfer_flags(source, tokenizer_dir, *extra) -> list[str]:
    flags = ["--source_run", str(source), "--target", "cfimdb", "--tokenizer", str(tokenizer_dir)]
    return flags + [
        "--data_dir",
        str(DATA_DIR),
        "--device",
        TEST_DEVICE,
        "--dev_limit",
        "24",
        "--test_limit",
        "2",
        *extra,
    ]


@pytest.mark.slow
def test_sst_to_cfimdb_end_to_end_writes_both_blocks_from_the_source_weights(tmp_path, tiny_ckpt, tokenizer_dir):
    out, source = _source_run(tmp_path, tiny_ckpt, tokenizer_dir)
    assert transfer.main(_transfer_flags(source, tokenizer_dir)) == 0
    (run_dir,) = [p for p in out.iterdir() if p.name.startswith("sst-to-cfimdb-")]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    source_metrics = json.loads((source / "metrics.json").read_text())
    assert metrics["source"]["run"] == source.name and metrics["source"]["value"] == source_metrics["dev_acc"]
    zero, after = metrics["zero_shot"], metrics["transfer"]
    assert zero["available"] and {"dev_acc", "dev_f1", "dev_majority_acc"} <= set(zero)
    assert after["dev_acc"] == metrics["dev_acc"] and after["target"] == "cfimdb"
    assert after["train_fraction"] == 0.01 and after["train_examples"] == 18  # 856 / 851 per label -> 9 + 9
    assert after["dev_majority_acc"] == zero["dev_majority_acc"] > 0
    assert (run_dir / metrics["predictions"]["dev"]).is_file()
    record = json.loads((run_dir / "config.json").read_text())
    assert record["training"]["wandb_group"] == "mygrid"  # the source's group
    assert record["training"]["epochs"] == 1 and record["training"]["seed"] == 5  # defaults: 1, the source's
    assert record["training"]["lr"] == 5e-3  # inherited
    with open(out / "runs.tsv", newline="") as handle:
        rows = {r["run"]: r for r in csv.DictReader(handle, delimiter="\t")}
    assert rows[run_dir.name]["task"] == "sst-to-cfimdb" and float(rows[run_dir.name]["best_value"]) == after["dev_acc"]

    # The zero-shot block is the source model (its trained weights and head) scored on CFIMDB through the
    # label map: recomputed here from the source run folder alone, it must agree.
    model, heads, _ = load_model(str(source))
    model = model.to(TEST_DEVICE).eval()
    head = LastTokenClassifier(model.config.n_embd, 5)
    head.load_state_dict(heads["sst"])
    training = TrainingSettings(max_length=None, dev_limit=24, test_limit=2, eval_batch_size=32)
    cfimdb = CFIMDB(load_tokenizer(tokenizer_dir), DATA_DIR, training, model.config.n_positions)
    logits = cfimdb.dev_logits(model, head.to(TEST_DEVICE), TEST_DEVICE)
    predictions = transfer.map_to_target(logits, transfer.LABEL_MAPS[("sst", "cfimdb")]).argmax(-1)
    gold = torch.tensor([e.label for e in cfimdb.dev])
    assert zero["dev_acc"] == (predictions == gold).sum().item() / len(gold)


@pytest.mark.slow
def test_transfer_starts_from_the_source_weights_and_a_fresh_head(tmp_path, tiny_ckpt, tokenizer_dir):
    _, source = _source_run(tmp_path, tiny_ckpt, tokenizer_dir)
    spec, start = transfer.parse(_transfer_flags(source, tokenizer_dir))
    assert spec.label == "sst-to-cfimdb" and spec.tasks == ("cfimdb",)
    config = spec.config
    model = GPT2LMHeadModel.from_pretrained(
        spec.checkpoint.source, **{k: getattr(config, k) for k in ("use_lora", "lora_r")}
    )
    assert model.config == config
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start.load(model)
    saved, _, _ = ckpt.load_checkpoint(ckpt.checkpoint_folder(source / "checkpoints", "best"))
    adapters = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}
    assert adapters and all("lora" in k for k in adapters)  # the source trained its adapters only
    state = model.state_dict()
    for name, value in adapters.items():
        assert torch.equal(state[name], value), name
        assert not torch.equal(before[name], value), f"{name} did not move in training: the check is empty"
    assert set(start.source_heads) == {"sst"}  # kept for the zero-shot score, not as the CFIMDB head


@pytest.mark.slow
def test_from_scratch_control_is_the_plain_run_and_cfimdb_to_sst_has_no_zero_shot(tmp_path, tiny_ckpt, tokenizer_dir):
    out, source = _source_run(tmp_path, tiny_ckpt, tokenizer_dir, task="cfimdb")
    flags = _transfer_flags(source, tokenizer_dir, "--from_scratch")
    flags[flags.index("cfimdb")] = "sst"
    scratch_dir = transfer.planned_run_dir(flags)
    plain = ["--task", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, out), "--use_lora", "--lora_r", "4"]
    plain += ["--train_fraction", "0.01", "--epochs", "1", "--seed", "5", "--batch_size", "8", "--lr", "5e-3"]
    plain += ["--dev_limit", "24", "--test_limit", "2"]
    assert scratch_dir == entry.planned_run_dir(entry.GENERIC, plain)
    assert transfer.main([f for f in flags if f != "--from_scratch"]) == 0
    (moved,) = [p for p in out.iterdir() if p.name.startswith("cfimdb-to-sst-")]
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["zero_shot"]["available"] is False and "neutral" in metrics["zero_shot"]["reason"]
    assert metrics["transfer"]["train_examples"] == 85  # SST-5: 11 + 22 + 16 + 23 + 13


def test_refusals_exit_2_with_one_line_before_any_run_folder(tmp_path, tiny_ckpt, tokenizer_dir, capsys):
    out, source = tmp_path / "runs", tmp_path / "runs" / "not-a-run"
    source.mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        transfer.main(_transfer_flags(source, tokenizer_dir))
    assert exit_info.value.code == 2 and "not a run folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["not-a-run"]


@pytest.mark.slow
def test_a_fraction_missing_a_label_and_architecture_flags_are_refused(tmp_path, tiny_ckpt, tokenizer_dir, capsys):
    out, source = _source_run(tmp_path, tiny_ckpt, tokenizer_dir)
    before = sorted(p.name for p in out.iterdir())
    assert transfer.main(_transfer_flags(source, tokenizer_dir, "--target_fraction", "0.0005")) == 2
    assert "no example of label(s) 0 (856 there), 1 (851 there)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # refused before a run folder was made
    for extra, message in [
        (["--use_kan"], "come from the source run"),
        (["--train_fraction", "0.5"], "--target_fraction"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            transfer.main(_transfer_flags(source, tokenizer_dir, *extra))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    flags = _transfer_flags(source, tokenizer_dir)
    flags[flags.index("cfimdb")] = "sst"
    with pytest.raises(SystemExit):
        transfer.main(flags)
    assert "own task" in capsys.readouterr().err


def test_help_lists_only_the_flags_transfer_accepts(capsys):
    """The variant flags and --train_fraction parse (so their refusal can say why) but are not offered."""
    from train.cli.parse import config_fields

    with pytest.raises(SystemExit):
        transfer.main(["--help"])
    shown = set(re.findall(r"--[a-z][\w-]*", capsys.readouterr().out.split("options:", 1)[1]))
    hidden = {f"--{f.name}" for f in config_fields()} | {"--train_fraction"}
    assert "--use_lora" in hidden and "--target_fraction" in shown and "--source_run" in shown
    assert not shown & hidden, sorted(shown & hidden)


def test_the_cka_figure_title_is_not_clipped(tmp_path):
    """A run folder's name is longer than a panel is wide: the title wraps, and nothing of it is cut."""
    import matplotlib.image

    from experiments.cka import POOLINGS, heatmaps

    name = "runs/sst-kora-r8-d64-value-lr0.0002-s11711-3f9c2a1e-with-a-long-label"
    result = {
        "n": 48,
        "task": "sst",
        "models": {"a": name},
        "layers_a": [0, 1],
        "layers_b": [0, 1],
        "cka": {pooling: {"within_a": [[1.0, 0.98], [0.98, 1.0]]} for pooling in POOLINGS},
    }
    heatmaps(result, tmp_path / "cka.png")
    image = matplotlib.image.imread(tmp_path / "cka.png")
    ink = (image[..., :3].mean(-1) < 0.5).any(0)  # columns holding dark pixels (text, axes)
    assert not ink[0] and not ink[-1], "something touches the left or right edge: clipped"
    assert image.shape[1] < 1.3 * 3.6 * 100, "the title did not wrap: the figure grew to fit it"
