"""torchrun and CUDA placement, tested with CPU stand-ins: 2-process gloo runs for per-rank RNG and
resume, spawned gloo processes for sharded sonnet evaluation, and the device/backend rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import DATA_DIR, REPO, TEST_DEVICE, data_limits, free_port, plugin_env, run_paths
from train.run import checkpoint as ckpt
from train.trainer import distributed


@pytest.mark.parametrize(
    "requested, local_rank, world, expected",
    [
        ("cuda", 1, 2, "cuda:1"),  # every rank its own GPU, not all on cuda:0
        ("cuda:0", 3, 4, "cuda:3"),
        ("cuda:1", 0, 1, "cuda:1"),  # one process: the index asked for
        ("cpu", 1, 2, "cpu"),
    ],
)
def test_each_rank_gets_its_own_gpu(requested, local_rank, world, expected):
    assert distributed.rank_device(requested, local_rank, world) == expected


def test_backend_follows_the_device_not_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU box
    assert distributed.backend_for(distributed.rank_device("cpu", 0, 2)) == "gloo"
    assert distributed.backend_for(distributed.rank_device("auto", 1, 2)) == "nccl"
    assert distributed.rank_device("auto", 1, 2) == "cuda:1"


def test_rank_seeds_differ_and_rank_zero_keeps_the_run_seed():
    seeds = [distributed.rank_seed(7, rank) for rank in range(8)]
    assert seeds[0] == 7 and len(set(seeds)) == 8


def test_restore_rng_reads_each_ranks_state_and_old_numeric_cuda_keys():
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(ckpt.rng_state())
    tensors, meta = ckpt.rank_rng_states(states)
    assert ckpt.restore_rng(tensors, meta, rank=1)
    assert torch.equal(torch.get_rng_state(), states[1][0]["torch"])
    assert not ckpt.restore_rng(tensors, meta, rank=2)  # written by 2 processes: nothing for rank 2
    # the older layout keyed every GPU as rng.cuda.<i>; "10" must not sort before "2" (read as numbers)
    old = {"rng.torch": states[0][0]["torch"], **{f"rng.cuda.{i}": torch.full((4,), i) for i in (0, 2, 10)}}
    calls = []
    original = torch.cuda.set_rng_state
    try:
        torch.cuda.set_rng_state = lambda state, device: calls.append((int(state[0]), device))
        assert ckpt.restore_rng(old, {"python": states[0][1]["python"]}, rank=0, device="cuda:2")
    finally:
        torch.cuda.set_rng_state = original
    assert calls == [(2, "cuda:2")]  # its own GPU's state; fewer GPUs at resume is no IndexError


def test_step_clock_waits_for_the_device(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    from train.trainer.distributed import device_synchronize

    device_synchronize("cuda:1")
    device_synchronize("cpu")
    assert synced == ["cuda:1"]  # the index is passed on (a bare synchronize() waits on cuda:0 only)


def _torchrun(args: list[str], env: dict, port: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    return subprocess.run(command + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_resume_restores_each_ranks_rng(tiny_ckpt, tokenizer_dir, tmp_path):
    """An uninterrupted 2-process run and one stopped by SIGTERM after step 2 and resumed: from step 3
    on, each rank's RNG stream is the uninterrupted one's, and the two ranks' streams differ."""
    common = [
        "-m",
        "train.sentiment",
        "--dataset",
        "sst",
        *run_paths(tiny_ckpt[0], tokenizer_dir),
        *data_limits(16),
        "--epochs",
        "2",
        "--wandb",
        "disabled",
        "--device",
        "cpu",
    ]
    logs = {}
    for name, stop in (("straight", None), ("stopped", "2")):
        folder = tmp_path / name
        folder.mkdir()
        env = plugin_env(OMP_NUM_THREADS="1", GPT2_TEST_RNG_LOG=str(folder))
        if stop:
            env["GPT2_TEST_SIGTERM_AT"] = stop
        run = _torchrun([*common, "--out_dir", str(folder / "runs")], env, free_port())
        if stop:
            assert run.returncode != 0 and "interrupted by SIGTERM at step 2" in run.stderr, run.stderr[-3000:]
            # one report (rank 0's, after its background write landed), naming the checkpoint just written
            assert run.stderr.count("interrupted by SIGTERM") == 1 and "checkpoint at step 2." in run.stderr
            env.pop("GPT2_TEST_SIGTERM_AT")
            run = _torchrun([*common, "--out_dir", str(folder / "runs"), "--resume"], env, free_port())
        assert run.returncode == 0, run.stderr[-3000:]
        logs[name] = [(folder / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    straight, stopped = logs["straight"], logs["stopped"]
    assert len(straight[0]) == 4 and straight[0] != straight[1]  # 4 steps; per-rank streams
    for rank in (0, 1):
        assert stopped[rank] == straight[rank], f"rank {rank}"


def _sonnet_chrf_worker(rank: int, world: int, port: int, ckpt_dir: str, tokenizer_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from model import GPT2LMHeadModel, load_tokenizer
    from train.base.settings import TrainingSettings
    from train.tasks.sonnet import Sonnet, SonnetSettings

    training = TrainingSettings(max_length=None, dev_limit=5, test_limit=1, train_limit=1, seed=3, eval_batch_size=2)
    options = SonnetSettings(max_new_tokens=24, temperature=1.2, top_p=0.9, top_k=None, greedy=False)
    model = GPT2LMHeadModel.from_pretrained(ckpt_dir).eval()
    task = Sonnet(load_tokenizer(tokenizer_dir), DATA_DIR, training, model.config.n_positions, options)
    metrics = task.evaluate(model, None, None, "cpu", shard=(rank, world))
    if rank == 0:
        Path(out).write_text(json.dumps(metrics["dev_chrf"]))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sonnet_dev_chrf_is_the_same_with_one_or_two_processes(tiny_ckpt, tokenizer_dir, tmp_path):
    scores = {}
    for world in (1, 2):
        port = free_port()
        out = tmp_path / f"chrf{world}.json"
        mp.start_processes(  # forked: the ranks start with this process's imports (spawn re-imports: ~7 s)
            _sonnet_chrf_worker,
            args=(world, port, str(tiny_ckpt[0]), str(tokenizer_dir), str(out)),
            nprocs=world,
            start_method="fork",
        ) if world > 1 else _sonnet_chrf_worker(0, 1, port, str(tiny_ckpt[0]), str(tokenizer_dir), str(out))
        scores[world] = json.loads(out.read_text())
    assert scores[1] == scores[2] and scores[1] > 0


def test_background_checkpoint_snapshots_tensors_and_reports_errors(tmp_path):
    """Rank 0's checkpoint write runs on a thread (the other ranks go on training): what it writes is
    the state at submit time, even though training mutates the tensors right after; a write error
    surfaces at the next wait, not silently."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.ones(3)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    writer = ckpt.BackgroundWriter()
    expected = weight.detach().clone()
    ckpt.save_checkpoint(tmp_path, "last", 1, {"w": weight}, optimizer, scheduler, {"step": 1}, writer=writer)
    with torch.no_grad():
        weight.add_(100.0)  # the next training step, while the thread may still be writing
    writer.wait()
    saved, _, _ = ckpt.load_checkpoint(ckpt.checkpoint_folder(tmp_path, "last"))
    assert torch.equal(saved["w"], expected)
    (tmp_path / "blocked").write_text("a file where the checkpoint folder should go")
    ckpt.save_checkpoint(tmp_path / "blocked", "last", 2, {"w": weight}, optimizer, scheduler, {}, writer=writer)
    with pytest.raises(OSError):
        writer.wait()


def test_attention_mask_is_built_once_in_the_compute_dtype(monkeypatch):
    """A padded batch under bf16 autocast: every layer gets the same additive bf16 mask (no per-layer
    bool -> float conversion inside SDPA; it was a bool mask before); an unpadded batch gets none."""
    import modules.attention as attention
    from model import GPT2Config, GPT2LMHeadModel

    seen = []
    original = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F,
        "scaled_dot_product_attention",
        lambda q, k, v, attn_mask=None, **kw: seen.append(attn_mask) or original(q, k, v, attn_mask=attn_mask, **kw),
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, n_positions=32, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, attention_mask=mask)
        model(ids, attention_mask=torch.ones_like(ids))
    padded, plain = seen[:3], seen[3:]
    assert all(m is padded[0] for m in padded) and padded[0].dtype == torch.bfloat16
    assert plain == [None, None, None]


@pytest.mark.slow
def test_the_training_loop_waits_for_the_device_before_reading_the_step_clock(
    tiny_ckpt, tokenizer_dir, tmp_path, monkeypatch
):
    import train.trainer.loop as loop
    from train import sentiment

    synced = []
    monkeypatch.setattr(loop, "device_synchronize", lambda device: synced.append(device))
    flags = [*data_limits(8), "--max_steps", "2", "--wandb", "disabled"]
    args = ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *flags]
    assert sentiment.main(args) == 0
    assert synced == [TEST_DEVICE] * 2  # once per step, on the run's device


def test_precision_auto_is_bf16_on_a_cuda_gpu_with_bf16_and_fp32_elsewhere(monkeypatch):
    from train.trainer.runtime import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert resolve_precision("auto", "cuda") == "fp32"


@pytest.mark.slow
def test_cuda_kernel_settings_hold_only_while_training_runs_and_the_callers_come_back(
    tiny_ckpt, tokenizer_dir, tmp_path
):
    # Found on an H100: in-process training left TF32 on, and later fp32 parity checks in the same
    # process were off by ~1e-3; and cuDNN attention cost 110-185 ms for every new batch length.
    from train import sentiment
    from train.cli import entry
    from train.trainer.runtime import cuda_kernel_settings

    seen = []
    original = entry.train

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.cudnn_sdp_enabled()))
        return original(*args, **kwargs)

    torch.backends.cuda.matmul.allow_tf32 = False
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(entry, "train", spy)
        args = ["--dataset", "sst", *run_paths(tiny_ckpt[0], tokenizer_dir, tmp_path), *data_limits(4)]
        assert sentiment.main([*args, "--max_steps", "1", "--wandb", "disabled"]) == 0
    assert seen == [(True, False)]
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cuda.cudnn_sdp_enabled()
    cudnn = torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError), cuda_kernel_settings():
        raise RuntimeError
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is cudnn
