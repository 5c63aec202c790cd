"""Training end to end on ../shared data with a tiny random checkpoint: every entry point and variant
flag, overfitting, kill-and-resume, NaN guard, atomic checkpoints, CLI errors, torchrun, wandb."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DATA_DIR, REPO, free_port, kill_and_wait, plugin_env, run_command, run_paths
from train import multitask, paraphrase, sentiment, sonnet
from train.tasks.predictions import read_classification, read_sonnets

pytestmark = pytest.mark.slow  # end-to-end: `make test-fast` skips this file

QUICK = [
    "--train_limit",
    "16",
    "--dev_limit",
    "8",
    "--test_limit",
    "4",
    "--batch_size",
    "4",
    "--max_steps",
    "2",
    "--wandb",
    "disabled",
]
NO_DROPOUT = ["--embd_pdrop", "0", "--attn_pdrop", "0", "--resid_pdrop", "0"]
SHORT_SONNETS = ["--max_new_tokens", "8"]  # a sonnet-task flag: only entry points that train sonnets take it


def only_run(out):
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def check_outputs(run_dir, out):
    for name in ("config.json", "metrics.json", "log.jsonl"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["git_commit"] and config["parameters"]["trainable"] > 0
    rows = (out / "runs.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(run_dir.name)
    return json.loads((run_dir / "metrics.json").read_text()), config


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--use_lora"],
        ["--use_kan"],
        ["--use_kan", "--use_lora"],
        ["--use_graph"],
        ["--use_kora"],
        ["--use_graph", "--use_lora", "--graph_backend", "dense"],
    ],
)
def test_sentiment_every_variant(tiny_ckpt, tokenizer_dir, tmp_path, flags):
    assert sentiment.main(["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *QUICK, *flags]) == 0
    run_dir = only_run(tmp_path)
    metrics, config = check_outputs(run_dir, tmp_path)
    assert config["config"]["use_lora"] == ("--use_lora" in flags)
    dev = read_classification(run_dir / metrics["predictions"]["dev"])
    from task_data.sentiment import load_sentiment
    from train.tasks.metrics import accuracy

    gold = load_sentiment("sst", "dev", DATA_DIR)[:8]
    assert metrics["dev_acc"] == accuracy([e.label for e in gold], [dev[e.id] for e in gold])
    if flags:
        assert config["parameters"]["trainable"] < config["parameters"]["total"]


def test_paraphrase_sonnet_multitask_entry_points(tiny_ckpt, tokenizer_dir, tmp_path):
    assert paraphrase.main([*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "p"), *QUICK, "--use_lora"]) == 0
    metrics, _ = check_outputs(only_run(tmp_path / "p"), tmp_path / "p")
    assert len(read_classification(only_run(tmp_path / "p") / metrics["predictions"]["test"])) == 4
    assert (
        sonnet.main([*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "s"), *QUICK, *SHORT_SONNETS, "--use_graph"])
        == 0
    )
    metrics, _ = check_outputs(only_run(tmp_path / "s"), tmp_path / "s")
    generated = read_sonnets(only_run(tmp_path / "s") / metrics["predictions"]["dev"])
    from task_data.sonnets import load_sonnets
    from train.tasks.sonnet import sonnet_chrf

    assert abs(metrics["dev_chrf"] - sonnet_chrf(generated, load_sonnets("dev_gold", DATA_DIR))) <= 1e-9
    assert (
        multitask.main(
            [
                *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "m"),
                *QUICK,
                *SHORT_SONNETS,
                "--tasks",
                "sst",
                "quora",
                "sonnet",
                "--task_sampling",
                "temperature",
                "--task_weights",
                "sonnet=0.5",
            ]
        )
        == 0
    )
    metrics, _ = check_outputs(only_run(tmp_path / "m"), tmp_path / "m")
    assert set(metrics["tasks"]) == {"sst", "quora", "sonnet"}
    expected = (
        metrics["tasks"]["sst"]["dev_acc"]
        + metrics["tasks"]["quora"]["dev_acc"]
        + metrics["tasks"]["sonnet"]["dev_chrf"] / 100
    ) / 3
    assert abs(metrics["selection_score"] - expected) <= 1e-9


@pytest.mark.parametrize(
    "flags, lr",
    [(["--fine_tune_mode", "full-model"], "3e-3"), (["--use_lora", "--lora_dropout", "0", "--lora_r", "16"], "1e-2")],
)
def test_overfits_16_examples(tiny_ckpt, tokenizer_dir, tmp_path, flags, lr):
    args = [
        *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path),
        "--dataset",
        "sst",
        "--train_limit",
        "16",
        "--dev_limit",
        "4",
        "--test_limit",
        "2",
        "--batch_size",
        "8",
        "--epochs",
        "100",
        "--lr",
        lr,
        "--eval_every",
        "20",
        "--eval_train",
        "--wandb",
        "disabled",
        *NO_DROPOUT,
        "--schedule",
        "constant",
        *flags,
    ]
    assert sentiment.main(args) == 0
    log = [json.loads(line) for line in (only_run(tmp_path) / "log.jsonl").read_text().splitlines()]
    train_acc = [entry["sst/train_acc"] for entry in log if "sst/train_acc" in entry]
    assert max(train_acc) == 1.0, train_acc


def _run(cmd, env=None, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def test_kill_and_resume_matches_uninterrupted(tiny_ckpt, tokenizer_dir, tmp_path):
    base = [
        sys.executable,
        "-m",
        "train.sentiment",
        "--dataset",
        "sst",
        *run_paths(tiny_ckpt[0], tokenizer_dir),
        "--train_limit",
        "48",
        "--dev_limit",
        "8",
        "--test_limit",
        "4",
        "--batch_size",
        "4",
        "--epochs",
        "2",
        "--save_every",
        "2",
        "--wandb",
        "disabled",
        "--use_lora",
    ]
    env = {"OMP_NUM_THREADS": "1"}
    # the uninterrupted run and the resume run in this process: only the killed run must be a process
    full = run_command(base + ["--out_dir", str(tmp_path / "full")], env)
    assert full.returncode == 0, full.stderr[-2000:]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        base + ["--out_dir", str(killed_dir)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=plugin_env(OMP_NUM_THREADS="1", GPT2_TEST_STEP_SLEEP="0.2"),
    )
    deadline = time.time() + 120
    killed_at, code = 0, None
    while time.time() < deadline:
        logs = list(killed_dir.glob("*/log.jsonl"))
        if logs:
            steps = [json.loads(line)["step"] for line in logs[0].read_text().splitlines() if line.strip()]
            if steps and max(steps) >= 5:  # mid-epoch 1 (12 steps per epoch)
                code = kill_and_wait(proc)
                killed_at = max(steps)
                break
        time.sleep(0.02)
    assert code == -signal.SIGKILL and killed_at >= 5
    run_dir = only_run(killed_dir)
    pointer = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert pointer["step"] < 12 and killed_at - pointer["step"] <= 2  # at most save_every steps are redone
    resumed = run_command(base + ["--out_dir", str(killed_dir), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full_dir = only_run(tmp_path / "full")
    a = json.loads((full_dir / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    for key in ("dev_acc", "dev_f1", "best_step", "steps"):
        assert a[key] == b[key], key
    last_a = load_file(str(next((full_dir / "checkpoints").glob("last-*")) / "trainable.safetensors"))
    last_b = load_file(str(next((run_dir / "checkpoints").glob("last-*")) / "trainable.safetensors"))
    assert set(last_a) == set(last_b) and all(torch.equal(last_a[k], last_b[k]) for k in last_a)


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward with an infinite gradient: a finite loss whose step would blow up."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_a_non_finite_gradient_norm_stops_the_run(tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch):
    """A finite loss with an infinite gradient: clipping would write NaN into the weights, so the run
    stops as diverged (exit 3) before the optimizer steps, as the CUDA-graph step does."""
    from train.tasks.classification import ClassificationTask

    original = ClassificationTask.loss_on
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return _InfiniteGradient.apply(loss) if calls["n"] == 2 else loss

    monkeypatch.setattr(ClassificationTask, "loss_on", poisoned)
    flags = ["--train_limit", "16", "--dev_limit", "4", "--batch_size", "4", "--wandb", "disabled"]
    assert sentiment.main(["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *flags]) == 3
    diverged = json.loads((only_run(tmp_path) / "diverged.json").read_text())
    assert diverged["step"] == 2 and "gradient norm" in diverged["reason"]


def test_nan_guard_keeps_last_good_checkpoint(tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch):
    from train.tasks.classification import ClassificationTask

    original = ClassificationTask.loss_on  # the training step's loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(ClassificationTask, "loss_on", poisoned)
    code = sentiment.main(
        [
            "--dataset",
            "sst",
            *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path),
            "--train_limit",
            "32",
            "--dev_limit",
            "4",
            "--batch_size",
            "4",
            "--save_every",
            "2",
            "--wandb",
            "disabled",
        ]
    )
    assert code == 3
    checkpoints = only_run(tmp_path) / "checkpoints"
    pointer = json.loads((checkpoints / "last.json").read_text())
    assert pointer["step"] == 2
    assert load_file(str(checkpoints / pointer["folder"] / "trainable.safetensors"))


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    from train.run import checkpoint as ckpt

    weights = {"w": torch.ones(3)}
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, "last", 1, weights, optimizer, scheduler, {"step": 1})
    calls = {"n": 0}
    real = ckpt.save_file

    def failing(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, "last", 2, {"w": torch.zeros(3)}, optimizer, scheduler, {"step": 2})
    folder = ckpt.checkpoint_folder(tmp_path, "last")
    assert folder.name == "last-000001" and not (tmp_path / "last-000002").exists()
    assert torch.equal(ckpt.load_checkpoint(folder)[0]["w"], torch.ones(3))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus_flag"], "unrecognized arguments"),
        (["--fine_tune_mode", "adapters"], "needs a variant flag"),
        (["--use_lora", "--lora_init", "nope"], "invalid choice"),
        (["--use_lora", "--lora_dora", "--lora_init", "pissa"], "not supported"),
        (["--batch_size", "0"], "batch_size"),
    ],
)
def test_cli_rejects_bad_flags(tiny_ckpt, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sentiment.main(["--dataset", "sst", "--model", str(tiny_ckpt[0]), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_torchrun_two_processes_match_single_process(tiny_ckpt, tokenizer_dir, tmp_path, grad_accum):
    """2 ranks x batch 4 (or x 2 micro-batches of 2 with --grad_accum 2, DDP's all-reduce skipped on
    the first by no_sync) give the gradients, predictions and metrics of 1 process x batch 8."""
    common_args = [
        "-m",
        "train.sentiment",
        "--dataset",
        "sst",
        *run_paths(tiny_ckpt[0], tokenizer_dir),
        "--train_limit",
        "8",
        "--dev_limit",
        "4",
        "--test_limit",
        "2",
        "--max_steps",
        "1",
        "--no_bucket",
        "--wandb",
        "disabled",
        *NO_DROPOUT,
        "--use_lora",
        "--lora_dropout",
        "0",
        "--device",
        "cpu",  # gloo on CPU whatever GPT2_TEST_DEVICE says: two ranks on one GPU would prove nothing
    ]
    single = run_command(  # the single-process reference needs no process of its own
        [sys.executable, *common_args, "--batch_size", "8", "--out_dir", str(tmp_path / "one")],
        {"OMP_NUM_THREADS": "1", "GPT2_TEST_DUMP_GRADS": str(tmp_path / "g1.safetensors")},
    )
    assert single.returncode == 0, single.stderr[-2000:]
    double = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),  # the two parametrisations may run at once (pytest-xdist)
            *common_args,
            "--batch_size",
            str(4 // grad_accum),
            "--grad_accum",
            str(grad_accum),
            "--out_dir",
            str(tmp_path / "two"),
        ],
        plugin_env(OMP_NUM_THREADS="1", GPT2_TEST_DUMP_GRADS=str(tmp_path / "g2.safetensors")),
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert len((tmp_path / "two" / "runs.tsv").read_text().splitlines()) == 2  # one set of outputs
    g1, g2 = load_file(str(tmp_path / "g1.safetensors")), load_file(str(tmp_path / "g2.safetensors"))
    assert set(g1) == set(g2) and len(g1) > 0
    for key, value in g2.items():
        assert torch.allclose(value, g1[key], atol=1e-6, rtol=1e-4), key
    # evaluation is sharded over the ranks and gathered: the same predictions and metrics as one process
    one, two = only_run(tmp_path / "one"), only_run(tmp_path / "two")
    for split in ("dev", "test"):
        assert (one / "predictions" / f"sst-{split}-output.csv").read_text() == (
            two / "predictions" / f"sst-{split}-output.csv"
        ).read_text()
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    assert m1["dev_acc"] == m2["dev_acc"] and m1["dev_f1"] == m2["dev_f1"]


def test_wandb_offline_and_unavailable(tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch):
    args = [
        "--dataset",
        "sst",
        *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path / "w"),
        *QUICK[:-2],
        "--wandb",
        "offline",
    ]
    assert sentiment.main(args) == 0
    files = list((only_run(tmp_path / "w") / "wandb").rglob("*.wandb"))
    assert files
    # wandb's service process writes the file; on a loaded machine it can lag finish() by a moment
    deadline = time.monotonic() + 30
    while not (b"train/loss" in files[0].read_bytes() and b"sst/dev_acc" in files[0].read_bytes()):
        assert time.monotonic() < deadline, f"{files[0]} lacks the logged metrics: {files[0].read_bytes()[:200]!r}"
        time.sleep(0.5)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    args[args.index(str(tmp_path / "w"))] = str(tmp_path / "x")
    with pytest.warns(UserWarning, match="wandb is unavailable"):
        assert sentiment.main(args) == 0
    assert (only_run(tmp_path / "x") / "metrics.json").is_file()


def test_kan_regulariser_is_added_to_the_training_loss(tiny_ckpt, tokenizer_dir, tmp_path):
    losses = {}
    for name, extra in (("plain", []), ("regularised", ["--kan_l1", "1.0", "--kan_entropy", "0.5"])):
        out = tmp_path / name
        assert (
            sentiment.main(
                [
                    "--dataset",
                    "sst",
                    *run_paths(tiny_ckpt[0], tokenizer_dir, out),
                    *QUICK,
                    "--use_kan",
                    "--kan_init",
                    "random",
                    *extra,
                ]
            )
            == 0
        )
        log = [json.loads(line) for line in (only_run(out) / "log.jsonl").read_text().splitlines()]
        losses[name] = next(e["train/loss"] for e in log if "train/loss" in e)
    from model import GPT2LMHeadModel
    from modules.kan import kan_regularization

    torch.manual_seed(11711)  # the runs' seed: the same random KAN init as step 0 of both runs
    model = GPT2LMHeadModel.from_pretrained(tiny_ckpt[0], use_kan=True, kan_init="random")
    expected = kan_regularization(model, 1.0, 0.5).item()
    assert abs((losses["regularised"] - losses["plain"]) - expected) <= 1e-3 * max(1.0, expected)


@pytest.mark.parametrize(
    "flags",
    [[], ["--use_lora", "--lora_dora"], ["--use_kan"], ["--use_kan", "--use_lora"], ["--use_graph"], ["--use_kora"]],
)
def test_bf16_autocast_trains_every_variant(tiny_ckpt, tokenizer_dir, tmp_path, flags):
    assert (
        sentiment.main(
            [
                "--dataset",
                "sst",
                *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path),
                *QUICK,
                "--precision",
                "bf16",
                *flags,
            ]
        )
        == 0
    )
    log = [json.loads(line) for line in (only_run(tmp_path) / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["train/loss"])) for e in log if "train/loss" in e)


def test_user_errors_are_one_line_messages(tiny_ckpt, tokenizer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # found while validating flags, before anything loads
        sentiment.main(["--dataset", "sst", *run_paths("/no/such/checkpoint", tokenizer_dir, tmp_path), *QUICK])
    assert exit_info.value.code == 2
    assert "checkpoint folder /no/such/checkpoint does not exist" in capsys.readouterr().err
    args = ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *QUICK]
    assert sentiment.main(args) == 0
    assert sentiment.main(args) == 2  # the same run again without --resume
    assert "holds a finished run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # an explicit --data_dir is never fetched into
        sentiment.main([*args, "--data_dir", str(tmp_path / "empty")])
    assert exit_info.value.code == 2
    assert "scripts/download_data.py" in capsys.readouterr().err


VARIANT_FLAGS = [[], ["--use_lora"], ["--use_kan"], ["--use_kan", "--use_lora"], ["--use_graph"], ["--use_kora"]]


@pytest.mark.parametrize("flags", VARIANT_FLAGS, ids=lambda f: "+".join(f) or "base")
@pytest.mark.parametrize(
    "entry, extra",
    [(paraphrase, []), (sonnet, SHORT_SONNETS), (multitask, ["--tasks", "cfimdb", "quora", "sonnet", *SHORT_SONNETS])],
    ids=["paraphrase", "sonnet", "multitask"],
)
def test_other_entry_points_every_variant(tiny_ckpt, tokenizer_dir, tmp_path, entry, extra, flags):
    assert entry.main([*run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *QUICK, *extra, *flags]) == 0
    metrics, config = check_outputs(only_run(tmp_path), tmp_path)
    assert bool(flags) == bool(config["variants"])  # a variant flag attaches a variant; none: the base
    assert metrics["steps"] == 2
