"""The one generic training loop: objectives (data + head + loss + metric) x one shared backbone.

Single task or multitask, CPU or GPU, one process or `torchrun --nproc_per_node N` (DDP; gloo on
CPU, NCCL on GPU; batches sharded per rank; only rank 0 evaluates, logs and writes). Checkpoints
survive a SIGKILL (train/checkpoint.py) and `--resume` continues bit-for-bit on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from datasets.common import data_dir
from model import GPT2Config, GPT2LMHeadModel, load_tokenizer
from model.files import atomic_write_json
from model.trainable import build_optimizer, set_trainable
from modules.registry import auxiliary_loss, enabled_variants
from train import checkpoint as ckpt
from train.cli import config_overrides, resolve_device
from train.runs import RunLogger, append_runs_tsv, config_hash, git_commit, new_wandb_id, run_name, variant_tag
from train.tasks import selection_score


class TrainingDiverged(RuntimeError):
    pass


class TaskModel(nn.Module):
    """Backbone + one head per task; forward(task, batch) -> loss (what DDP wraps)."""

    def __init__(self, model: nn.Module, heads: dict[str, nn.Module], objectives: dict, device: str) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads)
        self.objectives = objectives
        self.device_name = device

    def forward(self, task: str, batch: list[int]) -> torch.Tensor:
        head = self.heads[task] if task in self.heads else None
        return self.objectives[task].loss(self.model, head, batch, self.device_name)


def lr_lambda(schedule: str, warmup: float, total: int):
    warm = int(warmup) if warmup >= 1 else int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def epoch_schedule(
    objectives: dict, args: argparse.Namespace, epoch: int, rank: int, world: int
) -> list[tuple[str, list[int]]]:
    """(task, batch) pairs of one epoch for this rank; identical on every rank before sharding."""
    per_task = {
        name: obj.batches(epoch, args.batch_size, args.seed, bucket=not args.no_bucket)
        for name, obj in objectives.items()
    }
    rng = random.Random(args.seed * 1_000_003 + epoch)
    pairs = [(name, batch) for name, batches in per_task.items() for batch in batches]
    if len(per_task) > 1:
        rule = getattr(args, "task_sampling", "proportional")
        if rule == "proportional":
            rng.shuffle(pairs)  # sampling without replacement in proportion to each task's size
        else:
            sizes = {n: len(b) for n, b in per_task.items()}
            power = 0.0 if rule == "uniform" else 1.0 / args.sampling_temperature
            weights = [sizes[n] ** power for n in per_task]
            cursors = {n: 0 for n in per_task}
            pairs = []
            for _ in range(sum(sizes.values())):
                name = rng.choices(list(per_task), weights=weights)[0]
                pairs.append((name, per_task[name][cursors[name] % sizes[name]]))
                cursors[name] += 1
    usable = len(pairs) - len(pairs) % world
    return pairs[rank:usable:world]


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, int(os.environ.get("LOCAL_RANK", "0"))


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(task_label: str, task_classes: list, args: argparse.Namespace, config: GPT2Config) -> dict[str, Any]:
    """Train `task_classes` on one backbone. `config` is the run's resolved config (validated by the
    entry point before anything was loaded)."""
    rank, world, local_rank = _distributed()
    device = resolve_device(args.device)
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = GPT2LMHeadModel.from_pretrained(args.model, **config_overrides(args)).to(device)
    if model.config != config:
        raise RuntimeError(f"the loaded model's config differs from the validated one: {model.config} vs {config}")
    tokenizer = load_tokenizer(args.tokenizer)
    folder = data_dir(args.data_dir)
    objectives = {cls.name: cls(tokenizer, folder, args, config.n_positions) for cls in task_classes}
    heads = {name: head.to(device) for name, obj in objectives.items() if (head := obj.make_head(model)) is not None}
    counts = set_trainable(model, config.fine_tune_mode, heads.values())
    task_model = TaskModel(model, heads, objectives, device)
    wrapped: nn.Module = task_model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(task_model, find_unused_parameters=len(objectives) > 1)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, heads=heads.values())

    name = run_name(task_label, config, args)
    run_dir = Path(args.out_dir) / name
    checkpoints = run_dir / "checkpoints"
    main_process = rank == 0
    steps_per_epoch = math.ceil(len(epoch_schedule(objectives, args, 0, rank, world)) / args.grad_accum)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.schedule, args.warmup, total_steps))
    trainable = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    record = {
        "task": task_label,
        "run": name,
        "config": config.to_dict(),
        "variants": [v.name for v in enabled_variants(config)],
        "training": {k: v for k, v in vars(args).items() if k not in {f for f in config.to_dict()} and k != "argv"},
        "command": args.argv,
        "config_hash": config_hash(task_label, config, args),
        "wandb_id": new_wandb_id(task_label, config, args),
        "git_commit": git_commit(),
        "parameters": counts,
        "world_size": world,
        "device": device,
    }
    progress = {
        "epoch": 0,
        "position": 0,
        "step": 0,
        "best": None,
        "best_step": None,
        "bad_evals": 0,
        "train_seconds": 0.0,
        "best_metrics": None,
    }
    if args.resume:
        folder = ckpt.checkpoint_folder(checkpoints, "last")
        if folder is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {checkpoints}")
        saved = json.loads((run_dir / "config.json").read_text())
        if GPT2Config.from_dict(saved["config"]) != config:
            raise FileExistsError(f"--resume: {run_dir}/config.json has a different model config than these flags")
        record["wandb_id"] = saved.get("wandb_id", record["wandb_id"])  # the same wandb run continues
        weights, state, tensors = ckpt.load_checkpoint(folder)
        missing = sorted(set(trainable) - set(weights))
        if missing:
            raise ValueError(f"--resume: checkpoint {folder} lacks trainable weights {missing[:5]}")
        ckpt.copy_into(trainable, weights, folder)
        ckpt.restore_optimizer(optimizer, state, tensors)
        scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        ckpt.restore_rng(tensors, state["rng"])
        progress = state["progress"]
    elif main_process:
        if (run_dir / "checkpoints").exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or remove it")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", record)
    tags = [task_label, *(record["variants"] or ["base"])]
    logger = RunLogger(
        run_dir,
        name,
        record["wandb_id"],
        args.wandb_group or task_label,
        tags,
        record,
        args.wandb,
        args.wandb_project,
        enabled=main_process,
    )

    def save(kind: str) -> None:
        if main_process:
            ckpt.save_checkpoint(checkpoints, kind, progress["step"], trainable, optimizer, scheduler, progress)

    def evaluate() -> bool:
        """Every rank scores its share of dev (gathered); rank 0 logs, keeps the best predictions and
        checkpoint, and decides early stopping, which is broadcast to every rank."""
        staging = run_dir / ".predictions.tmp"
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        task_model.eval()
        metrics = {
            n: obj.evaluate(
                model, heads.get(n), staging if main_process else None, device, args.eval_train, (rank, world)
            )
            for n, obj in objectives.items()
        }
        task_model.train()
        stop = False
        if main_process:
            score = selection_score(metrics)
            flat = {f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items() if k != "predictions"}
            logger.log({**flat, "dev/selection_score": score, "epoch": progress["epoch"]}, progress["step"])
            if progress["best"] is None or score > progress["best"]:
                progress.update(best=score, best_step=progress["step"], bad_evals=0, best_metrics=metrics)
                shutil.rmtree(run_dir / "predictions", ignore_errors=True)
                os.replace(staging, run_dir / "predictions")
                save("best")
            else:
                progress["bad_evals"] += 1
                shutil.rmtree(staging, ignore_errors=True)
            stop = bool(args.patience) and progress["bad_evals"] >= args.patience
        if world > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        return stop

    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")
    wrapped.train()
    start_time = time.perf_counter() - progress["train_seconds"]
    tokens_since, clock = 0, time.perf_counter()
    stopped = progress["step"] >= total_steps
    evaluated_at = None
    bar = tqdm(total=total_steps, initial=progress["step"], disable=not main_process, desc=name[:40], mininterval=1.0)
    while not stopped and progress["epoch"] < args.epochs:
        schedule = epoch_schedule(objectives, args, progress["epoch"], rank, world)
        while progress["position"] < len(schedule):
            group = schedule[progress["position"] : progress["position"] + args.grad_accum]
            for task, batch in group:
                with autocast:
                    loss = wrapped(task, batch) * getattr(args, "task_weights", {}).get(task, 1.0)
                    if (extra := auxiliary_loss(model, config)) is not None:  # e.g. the KAN regulariser
                        loss = loss + extra
                if not torch.isfinite(loss):
                    last = ckpt.checkpoint_folder(checkpoints, "last")
                    raise TrainingDiverged(
                        f"non-finite loss ({loss.item()}) at step {progress['step']} on task {task}; stopped. "
                        f"The last good checkpoint is untouched: {last or 'none saved yet'}"
                    )
                (loss / len(group)).backward()
                tokens_since += objectives[task].batch_tokens(batch)
            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress["position"] += len(group)
            progress["step"] += 1
            bar.update(1)
            elapsed = time.perf_counter() - clock
            if main_process:
                bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tokens_since * world / max(elapsed, 1e-9):.0f}")
                logger.log(
                    {
                        "train/loss": loss.item(),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/grad_norm": float(grad_norm),
                        "train/tokens_per_s": tokens_since * world / elapsed,
                        "epoch": progress["epoch"],
                    },
                    progress["step"],
                )
            tokens_since, clock = 0, time.perf_counter()
            progress["train_seconds"] = time.perf_counter() - start_time
            end_of_epoch = progress["position"] >= len(schedule)
            if end_of_epoch:
                progress.update(epoch=progress["epoch"] + 1, position=0)
            last_step = progress["step"] >= total_steps or progress["epoch"] >= args.epochs
            if (
                (args.eval_every and progress["step"] % args.eval_every == 0)
                or (not args.eval_every and end_of_epoch)
                or last_step
            ):
                stopped = evaluate() or last_step
                evaluated_at = progress["step"]
                save("last")
            elif args.save_every and progress["step"] % args.save_every == 0:
                save("last")
            if stopped:
                break
    bar.close()
    if evaluated_at != progress["step"] and progress["best"] is None:
        evaluate()
        save("last")
    result = {}
    if main_process:
        best = progress["best_metrics"] or {}
        result = _finish(run_dir, name, task_label, config, args, record, progress, best, device, objectives)
        logger.summary(
            {
                "best/selection_score": progress["best"],
                **{f"best/{n}/{k}": v for n, m in best.items() for k, v in m.items() if k != "predictions"},
            }
        )
    logger.finish()
    if world > 1:
        dist.barrier()
    return result


def _finish(
    run_dir: Path, name: str, task_label: str, config, args, record, progress, best, device, objectives
) -> dict[str, Any]:
    single = len(objectives) == 1
    metrics: dict[str, Any] = dict(next(iter(best.values()))) if single else {"tasks": best}
    if single and "predictions" in metrics:
        metrics["predictions"] = {k: f"predictions/{v}" for k, v in metrics["predictions"].items()}
    metrics.update(
        selection_score=progress["best"],
        best_step=progress["best_step"],
        steps=progress["step"],
        train_seconds=round(progress["train_seconds"], 3),
        peak_memory_mb=round(_peak_memory_mb(device), 1),
    )
    atomic_write_json(run_dir / "metrics.json", metrics)
    primary = next(iter(objectives.values())).metric if single else "selection_score"
    best_value = metrics.get(primary, progress["best"])
    append_runs_tsv(
        Path(args.out_dir) / "runs.tsv",
        {
            "run": name,
            "task": task_label,
            "variant": variant_tag(config),
            "config_hash": record["config_hash"],
            "seed": args.seed,
            "lr": args.lr,
            "fine_tune_mode": config.resolved_fine_tune_mode,
            "trainable_params": record["parameters"]["trainable"],
            "total_params": record["parameters"]["total"],
            "metric": primary,
            "best_value": best_value,
            "best_step": progress["best_step"],
            "dev_metrics": json.dumps({n: {k: v for k, v in m.items() if k != "predictions"} for n, m in best.items()}),
            "train_seconds": metrics["train_seconds"],
            "peak_memory_mb": metrics["peak_memory_mb"],
            "steps": progress["step"],
            "git_commit": record["git_commit"],
            "run_dir": str(run_dir),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    print(
        f"done {name}: best {primary} = {best_value:.4f} at step {progress['best_step']} "
        f"(epoch {progress['epoch']}), {metrics['train_seconds']:.1f} s, "
        f"{record['parameters']['trainable']:,} of {record['parameters']['total']:,} parameters trained -> {run_dir}"
    )
    return metrics
