"""The one generic training loop: objectives (data + head + loss + metric) x one shared backbone.

Single task or multitask, CPU or GPU, one process or `torchrun --nproc_per_node N` (DDP; gloo on
CPU, NCCL on GPU; batches sharded per rank; only rank 0 evaluates, logs and writes). Checkpoints
survive a SIGKILL (train/checkpoint.py) and `--resume` continues bit-for-bit on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from datasets.common import data_dir
from model import GPT2LMHeadModel, load_tokenizer
from model.compile import compile_blocks
from model.config import STACK_FIELDS
from model.files import atomic_write_json
from model.trainable import build_optimizer, set_trainable
from train import checkpoint as ckpt
from train import distributed, graphs, lifecycle
from train.distributed import device_synchronize
from train.run import new_wandb_id, owned, run_folder
from train.runs import RunLogger, git_commit, truncate_log, write_runs_row
from train.runtime import autocast_for, resolve_precision
from train.settings import MultitaskSettings, TrainingSettings
from train.spec import RunSpec, variant_tag
from train.tasks import TASKS, selection_score

TrainingDiverged = lifecycle.TrainingDiverged


class TaskModel(nn.Module):
    """Backbone + one head per task; forward(task, batch) -> loss (what DDP wraps)."""

    def __init__(self, model: nn.Module, heads: dict[str, nn.Module], objectives: dict, device: str) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(heads)
        self.objectives = objectives
        self.device_name = device

    def forward(self, task: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        head = self.heads[task] if task in self.heads else None
        return self.objectives[task].loss_on(self.model, head, inputs)


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
    objectives: dict,
    training: TrainingSettings,
    epoch: int,
    rank: int,
    world: int,
    mixture: MultitaskSettings | None = None,
) -> list[tuple[str, list[int]]]:
    """(task, batch) pairs of one epoch for this rank; identical on every rank before sharding."""
    per_task = {
        name: obj.batches(epoch, training.batch_size, training.seed, bucket=not training.no_bucket)
        for name, obj in objectives.items()
    }
    rng = random.Random(training.seed * 1_000_003 + epoch)
    mixture = mixture or MultitaskSettings()
    pairs = [(name, batch) for name, batches in per_task.items() for batch in batches]
    if len(per_task) > 1:
        rule = mixture.task_sampling
        if rule == "proportional":
            rng.shuffle(pairs)  # sampling without replacement in proportion to each task's size
        else:
            sizes = {n: len(b) for n, b in per_task.items()}
            power = 0.0 if rule == "uniform" else 1.0 / mixture.sampling_temperature
            weights = [sizes[n] ** power for n in per_task]
            cursors = {n: 0 for n in per_task}
            pairs = []
            for _ in range(sum(sizes.values())):
                name = rng.choices(list(per_task), weights=weights)[0]
                pairs.append((name, per_task[name][cursors[name] % sizes[name]]))
                cursors[name] += 1
    usable = len(pairs) - len(pairs) % world
    return pairs[rank:usable:world]


def _peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Console:
    """Progress on stderr: a tqdm bar (refreshed at most twice a second) on a terminal; otherwise (a log
    file, SLURM) one plain line every `every` steps. Messages always get their own line."""

    def __init__(self, enabled: bool, total: int, initial: int, name: str, every: int) -> None:
        self.enabled, self.total, self.every = enabled, total, every
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=name[:40], mininterval=0.5, disable=not self.tty)
        self.start = time.perf_counter()

    def step(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['train/tokens_per_s']:.0f}")
        elif self.every and (step % self.every == 0 or step == self.total):
            print(
                f"step {step}/{self.total} epoch {epoch + 1} loss {values['train/loss']:.4f} "
                f"lr {values['train/lr']:.3g} tok/s {values['train/tokens_per_s']:.0f} "
                f"elapsed {time.perf_counter() - self.start:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _all_ranks_any(flags: list[bool], world: int, device: str) -> list[bool]:
    """Each flag true on every rank when it is true on any (so every rank stops or saves at the same step)."""
    if world == 1:
        return flags
    value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def _gathered_rng(world: int, device: str) -> tuple:
    """Every rank's RNG state (collective: every rank calls it at the same step)."""
    own = ckpt.rng_state(device)
    if world == 1:
        return ckpt.rank_rng_states([own])
    states: list = [None] * world
    dist.all_gather_object(states, ({k: v.cpu() for k, v in own[0].items()}, own[1]))
    return ckpt.rank_rng_states(states)


def _metrics_line(step: int, epoch: float, metrics: dict, score: float, best: bool) -> str:
    parts = [
        f"{task} {key} {value:.4f}"
        for task, values in metrics.items()
        for key, value in values.items()
        if key.startswith("dev_") and isinstance(value, int | float)
    ]
    return (
        f"step {step} (epoch {epoch:.2f}): "
        + ", ".join(parts)
        + f"; selection {score:.4f}"
        + (" [best]" if best else "")
    )


def train(spec: RunSpec, signals=None, start=None) -> dict:
    """Train the spec's tasks on one backbone. `spec.config` is the run's resolved config (validated by
    the entry point before anything was loaded). `signals`: a StopSignals the caller entered (SIGINT /
    SIGTERM then stop after the current step with a checkpoint, raising Interrupted). `start`: a run
    that begins from another run's trained weights (train/transfer.py), with
    - `load(model)`: copy them in, before the task heads are built and anything trains;
    - `before_training(model, objectives, device, autocast, shard) -> dict`: blocks (e.g. the zero-shot
      metrics) computed once on the starting weights and kept in config.json (a resumed run keeps them);
    - `final_blocks(record, best_metrics) -> dict`: blocks added to metrics.json."""
    signals = signals or lifecycle.StopSignals()
    mixture = spec.settings_of("multitask")
    placement = distributed.setup(spec.runtime.device)
    # fp32 matmuls use TF32 (entry.run: cuda_kernel_settings)
    precision = resolve_precision(spec.runtime.precision, placement.device)

    run_dir = run_folder(spec)
    identity = spec.identity()
    with owned(run_dir, placement.main):  # one writer for the folder's whole life (train/run.py)
        return _train(spec, signals, start, placement, precision, run_dir, identity, mixture)


def _train(spec: RunSpec, signals, start, placement, precision, run_dir, identity, mixture) -> dict:
    config, task_label, name = spec.config, spec.label, run_dir.name
    rank, world, device, main_process = placement.rank, placement.world, placement.device, placement.main
    checkpoints = run_dir / "checkpoints"
    state = lifecycle.folder_state(run_dir)
    saved_record = lifecycle.check_run_folder(run_dir, state, spec, main_process)
    if saved_record is not None and state == "finished" and not spec.output.extend_epochs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if main_process:
            print(
                f"{run_dir} is already finished (selection score {metrics.get('selection_score')} at step "
                f"{metrics.get('best_step')}); nothing to do. --resume --extend_epochs N trains it further."
            )
        return metrics
    if signals.received is not None:
        raise lifecycle.Interrupted(signals.received, "interrupted before training started; nothing to save")
    resume = spec.output.resume and state in ("interrupted", "finished")
    extra_epochs = (saved_record or {}).get("extra_epochs", 0) + (spec.output.extend_epochs or 0)
    epochs = spec.training.epochs + extra_epochs

    tokenizer = load_tokenizer(spec.output.tokenizer)
    folder = data_dir(spec.output.data_dir)
    fast = spec.runtime.fast_step == "on"
    objectives = {
        n: TASKS[n](tokenizer, folder, spec.training, config.n_positions, spec.settings_of(n), fast) for n in spec.tasks
    }
    for objective in objectives.values():
        objective.check_training_data()  # e.g. a --train_fraction missing a label: refused before weights load
        objective.check_token_ids(config.vocab_size)  # once here, so no training step checks (or syncs)
    torch.manual_seed(spec.training.seed)
    random.seed(spec.training.seed)
    overrides = {k: v for k, v in config.to_dict().items() if k not in STACK_FIELDS and k != "name"}
    model = GPT2LMHeadModel.from_pretrained(spec.checkpoint.source, **overrides).to(device)
    if model.config != config:
        raise RuntimeError(f"the loaded model's config differs from the validated one: {model.config} vs {config}")
    if start is not None:
        start.load(model)
    heads = {name: head.to(device) for name, obj in objectives.items() if (head := obj.make_head(model)) is not None}
    counts = set_trainable(model, config.fine_tune_mode, heads.values())
    if spec.runtime.grad_checkpointing:
        model.transformer.gradient_checkpointing = True
    task_model = TaskModel(model, heads, objectives, device)
    wrapped: nn.Module = task_model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(task_model, find_unused_parameters=len(objectives) > 1)
        # Every rank built the same weights from the run's seed; dropout now gets its own stream per rank.
        torch.manual_seed(distributed.rank_seed(spec.training.seed, rank))
    # The fast step (train/graphs.py): static shapes always; the whole step as CUDA graphs where it can.
    static_rows = spec.training.batch_size if fast else None
    not_captured = (
        graphs.why_not_captured(
            device,
            world,
            spec.training.grad_accum,
            spec.runtime.grad_checkpointing,
            len(objectives),
            dropout=graphs.uses_dropout(model, heads.values()),
        )
        if fast
        else None
    )
    capture = fast and not_captured is None
    if spec.runtime.compile:
        compile_blocks(model, static_shapes=fast)
    fused = {"fused": True} if device.startswith("cuda") else {}  # one kernel for all parameters
    if capture:
        fused["capturable"] = True  # its step count and lr live on the device, so a graph can hold it
    optimizer = build_optimizer(model, spec.training.lr, spec.training.weight_decay, heads=heads.values(), **fused)

    steps_per_epoch = math.ceil(
        len(epoch_schedule(objectives, spec.training, 0, rank, world, mixture)) / spec.training.grad_accum
    )
    total_steps = spec.training.max_steps or steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(spec.training.schedule, spec.training.warmup, total_steps)
    )
    trainable = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    # checkpoints hold the trainable weights plus frozen variant state a rebuild would not reproduce
    frozen = {f"model.{k}": v for k, v in model.variant_state(checkpoints_only=True).items()}
    checkpointed = {**trainable, **frozen}
    config_values = {**config.to_dict(), "fine_tune_mode": config.resolved_fine_tune_mode}
    record = {
        "task": task_label,
        "run": name,
        "grid": spec.output.wandb_group,
        "config": config_values,
        "variants": [v.name for v in config.variants],
        "training": spec.flat_settings(),
        "identity": identity,
        "spec": spec.to_json(),
        "command": list(spec.argv),
        "config_hash": spec.identity_hash(),
        "wandb_id": new_wandb_id(spec),
        "git_commit": git_commit(),
        "parameters": counts,
        "world_size": world,
        "device": device,
        "precision": precision,  # what --precision auto resolved to on this device
        "extra_epochs": extra_epochs,
    }
    autocast = autocast_for(device, precision)
    if start is not None:
        if resume and "start" in saved_record:
            record["start"] = saved_record["start"]
        else:
            record["start"] = start.before_training(model, objectives, device, autocast, (rank, world))
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
    if resume:
        folder = ckpt.checkpoint_folder(checkpoints, "last")
        record["wandb_id"] = saved_record.get("wandb_id", record["wandb_id"])  # the same wandb run continues
        record["command"] = saved_record.get("command", record["command"])
        record["resumed_with"] = list(spec.argv)
        weights, state_json, tensors = ckpt.load_checkpoint(folder)
        missing = sorted(set(trainable) - set(weights))
        if missing:
            raise ckpt.CheckpointCorrupt(f"--resume: checkpoint {folder} lacks trainable weights {missing[:5]}")
        ckpt.copy_into(checkpointed, weights, folder)
        ckpt.restore_optimizer(optimizer, state_json, tensors)
        for group in optimizer.param_groups:  # how this run steps, not how the saving run did
            group.update({key: value for key, value in fused.items() if key in ("fused", "capturable")})
        scheduler.load_state_dict({**state_json["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        if not ckpt.restore_rng(tensors, state_json["rng"], rank, device):
            print(
                f"rank {rank}: the checkpoint has no RNG state for this rank (fewer processes wrote it); "
                "its streams start from the rank's seed",
                file=sys.stderr,
            )
        progress = state_json["progress"]
        if spec.output.extend_epochs:
            progress["bad_evals"] = 0  # patience counts afresh in the added epochs
        if main_process:
            dropped = truncate_log(run_dir / "log.jsonl", progress["step"])
            print(
                f"resuming {name} from step {progress['step']} ({progress['epoch']} epoch(s) completed)"
                + (f"; dropped {dropped} log line(s) written after that checkpoint" if dropped else ""),
                file=sys.stderr,
            )
            if spec.output.extend_epochs:
                old_lr = scheduler.get_last_lr()[0]
                new_lr = spec.training.lr * lr_lambda(spec.training.schedule, spec.training.warmup, total_steps)(
                    progress["step"]
                )
                print(
                    f"extending by {spec.output.extend_epochs} epoch(s) to {epochs}: training continues to step "
                    f"{total_steps}; "
                    f"the {spec.training.schedule} schedule is re-planned over {total_steps} steps, so the lr goes "
                    f"from {old_lr:.3g} to {new_lr:.3g} at step {progress['step']}",
                    file=sys.stderr,
                )
            if note := lifecycle.diverged_note(run_dir):
                print(note, file=sys.stderr)
            atomic_write_json(run_dir / "config.json", record)
    elif main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", record)
    tags = [task_label, *(record["variants"] or ["base"])]
    wandb_config = {
        **config_values,
        **record["training"],
        "task": task_label,
        "grid": spec.output.wandb_group,
        "run": name,
    }
    logger = RunLogger(
        run_dir,
        name,
        record["wandb_id"],
        spec.output.wandb_group or task_label,
        tags,
        wandb_config,
        spec.output.wandb,
        spec.output.wandb_project,
        enabled=main_process,
    )
    console = Console(main_process, total_steps, progress["step"], name, spec.output.log_every)
    if fast and not_captured is not None and main_process:
        console.message(f"fast step: static shapes, eager (no CUDA graphs: {not_captured})")
    task_weights = dict(mixture.task_weights) if mixture is not None else {}

    def step_loss(task: str, inputs: dict[str, torch.Tensor], autocast_context) -> torch.Tensor:
        with autocast_context:
            loss = wrapped(task, inputs) * task_weights.get(task, 1.0)
            if (extra := model.auxiliary_loss()) is not None:  # e.g. the KAN regulariser
                loss = loss + extra
        return loss

    captured = None  # CapturedSteps, made after the first (eager) step measured no host sync
    autocast_static = autocast_for(device, precision, cache=False)  # a graph must not bake in autocast's cache

    # Under torchrun rank 0 writes on a thread, so the other ranks never wait in a collective for its disk.
    writer = ckpt.BackgroundWriter() if world > 1 and main_process else None

    def save(kind: str, snapshot: tuple | None = None) -> None:
        """Write a checkpoint of the current weights; `snapshot` = (progress, every rank's RNG) recorded
        at the end of the step those weights belong to (all ranks call snapshot() together). Without
        one (the "best" checkpoint, rank 0 only), rank 0's RNG is recorded."""
        if main_process:
            saved_progress, rng = snapshot or (progress, None)
            ckpt.save_checkpoint(
                checkpoints,
                kind,
                saved_progress["step"],
                checkpointed,
                optimizer,
                scheduler,
                saved_progress,
                rng,
                writer,
            )
        nonlocal last_save
        last_save = time.monotonic()

    def snapshot() -> tuple:
        return copy.deepcopy(progress), _gathered_rng(world, device)

    def saved_checkpoint() -> Path | None:
        if writer is not None:
            writer.wait()
        return ckpt.checkpoint_folder(checkpoints, "last")

    def evaluate() -> bool:
        """Every rank scores its share of dev (gathered); rank 0 logs, keeps the best predictions and
        checkpoint, and decides early stopping, which is broadcast to every rank."""
        staging = run_dir / ".predictions.tmp"
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        task_model.eval()
        with autocast:  # evaluation computes in the run's precision too
            metrics = {
                n: obj.evaluate(
                    model,
                    heads.get(n),
                    staging if main_process else None,
                    device,
                    spec.output.eval_train,
                    (rank, world),
                )
                for n, obj in objectives.items()
            }
        task_model.train()
        stop = False
        if main_process:
            score = selection_score(metrics)
            flat = {f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items() if k != "predictions"}
            logger.log({**flat, "dev/selection_score": score, "epoch": progress["epoch"]}, progress["step"])
            improved = progress["best"] is None or score > progress["best"]
            console.message(
                _metrics_line(progress["step"], progress["step"] / steps_per_epoch, metrics, score, improved)
            )
            if improved:
                progress.update(best=score, best_step=progress["step"], bad_evals=0, best_metrics=metrics)
                shutil.rmtree(run_dir / "predictions", ignore_errors=True)
                os.replace(staging, run_dir / "predictions")
                save("best")
            else:
                progress["bad_evals"] += 1
                shutil.rmtree(staging, ignore_errors=True)
            stop = bool(spec.training.patience) and progress["bad_evals"] >= spec.training.patience
        if world > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        return stop

    def diverged(task: str, value: float, reason: str) -> lifecycle.TrainingDiverged:
        last = saved_checkpoint()
        info = {"step": progress["step"] + 1, "task": task, "loss": value if math.isfinite(value) else str(value)}
        info["reason"] = reason
        if main_process:
            atomic_write_json(run_dir / "diverged.json", info)
            logger.log({"diverged": reason, "epoch": progress["epoch"]}, progress["step"] + 1)
        if not main_process:  # rank 0 reports; another rank could read the pointer before rank 0's write lands
            return lifecycle.TrainingDiverged("")
        return lifecycle.TrainingDiverged(
            f"training diverged at step {progress['step'] + 1} on task {task}: {reason}; stopped. The last "
            f"healthy checkpoint is kept: {last or 'none saved yet'}"
        )

    guard = lifecycle.DivergenceGuard(spec.output.spike_factor)
    wrapped.train()
    start_time = time.perf_counter() - progress["train_seconds"]
    tokens_since, clock = 0, time.perf_counter()
    last_save = time.monotonic()
    pending = None  # a checkpoint due at the previous step, written once this step's loss shows its weights are healthy
    stopped = progress["step"] >= total_steps
    evaluated_at = None
    try:
        while not stopped and progress["epoch"] < epochs:
            schedule = epoch_schedule(objectives, spec.training, progress["epoch"], rank, world, mixture)
            while progress["position"] < len(schedule):
                group = schedule[progress["position"] : progress["position"] + spec.training.grad_accum]
                graph_step = None
                if captured is not None and pending is None:
                    ((task, batch),) = group
                    try:
                        graph_step = captured.step(task, objectives[task].inputs(batch, static_rows))
                    except RuntimeError as error:  # e.g. an op a CUDA graph cannot hold: eager from now on
                        console.message(f"fast step: capturing failed ({str(error).splitlines()[0][:200]}); eager")
                        captured, capture = None, False
                if graph_step is not None:
                    # The whole step is one graph replay; AdamW skipped itself on the device if the
                    # loss or gradient norm is not finite, so the guard below still stops healthy weights.
                    loss_t, norm_t = graph_step
                    loss_value, grad_norm_value = torch.stack([loss_t, norm_t]).tolist()  # the step's one sync
                    loss_values = [loss_value]
                    tokens_since += objectives[task].batch_tokens(batch)
                    spike = guard.check(task, loss_value)
                    if spike and not math.isfinite(loss_value):
                        raise diverged(task, loss_value, spike)
                    if not math.isfinite(grad_norm_value):
                        raise diverged(task, loss_value, f"non-finite gradient norm ({grad_norm_value})")
                    if spike:
                        console.message(f"step {progress['step'] + 1}: {spike}")
                    scheduler.step()
                else:
                    losses = []
                    syncs = graphs.SyncCounter() if capture and captured is None else None
                    for index, (task, batch) in enumerate(group):
                        inputs = {k: v.to(device) for k, v in objectives[task].inputs(batch, static_rows).items()}
                        # DDP all-reduces gradients on the last micro-batch only
                        last_micro = index == len(group) - 1 or world == 1
                        with contextlib.nullcontext() if last_micro else wrapped.no_sync():
                            with syncs if syncs is not None else contextlib.nullcontext():
                                loss = step_loss(task, inputs, autocast)
                                (loss / len(group)).backward()
                        losses.append(loss.detach().float())
                        tokens_since += objectives[task].batch_tokens(batch)
                    grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), spec.training.max_grad_norm)
                    # The step's one host sync: every micro-batch loss and the gradient norm at once.
                    *loss_values, grad_norm_value = torch.stack(
                        [*losses, grad_norm.float().to(losses[0].device)]
                    ).tolist()
                    spike = None
                    for (task, _), value in zip(group, loss_values, strict=True):
                        problem = guard.check(task, value)
                        if problem and not math.isfinite(value):
                            raise diverged(task, value, problem)
                        spike = spike or problem
                    if not math.isfinite(grad_norm_value):  # clipping would write NaN into the weights
                        raise diverged(group[-1][0], loss_values[-1], f"non-finite gradient norm ({grad_norm_value})")
                    if pending is not None:
                        if spike:
                            console.message(
                                f"step {progress['step'] + 1}: {spike}; the checkpoint of step {pending[0]['step']} "
                                f"(whose weights gave it) is not kept"
                            )
                        else:
                            save("last", pending)
                        pending = None
                    elif spike:
                        console.message(f"step {progress['step'] + 1}: {spike}")
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=not capture)  # captured graphs keep the .grad tensors
                    if syncs is not None:
                        if syncs.total:
                            capture = False
                            console.message(
                                "fast step: static shapes, eager (no CUDA graphs: this variant's layers sync with "
                                f"the host {syncs.total} time(s) per step: {dict(syncs.counts)})"
                            )
                        else:
                            captured = graphs.CapturedSteps(
                                lambda task, inputs: step_loss(task, inputs, autocast_static),
                                list(trainable.values()),
                                optimizer,
                                spec.training.max_grad_norm,
                                device,
                            )
                progress["position"] += len(group)
                progress["step"] += 1
                device_synchronize(device)  # the clock must see the step finish on the device
                elapsed = time.perf_counter() - clock
                values = {
                    "train/loss": loss_values[-1],
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm_value,
                    "train/tokens_per_s": tokens_since * world / max(elapsed, 1e-9),
                    "epoch": progress["epoch"],
                }
                if main_process:
                    logger.log(values, progress["step"])
                console.step(progress["step"], progress["epoch"], values)
                tokens_since, clock = 0, time.perf_counter()
                progress["train_seconds"] = time.perf_counter() - start_time
                end_of_epoch = progress["position"] >= len(schedule)
                if end_of_epoch:
                    progress.update(epoch=progress["epoch"] + 1, position=0)
                last_step = progress["step"] >= total_steps or progress["epoch"] >= epochs
                time_due = (
                    bool(spec.output.save_every_minutes)
                    and time.monotonic() - last_save >= 60 * spec.output.save_every_minutes
                )
                stop_now, time_due = _all_ranks_any([signals.received is not None, time_due], world, device)
                if (
                    (spec.training.eval_every and progress["step"] % spec.training.eval_every == 0)
                    or (not spec.training.eval_every and end_of_epoch)
                    or last_step
                ):
                    stopped = evaluate() or last_step
                    evaluated_at = progress["step"]
                    if stopped:
                        save("last", snapshot())
                    else:
                        pending = snapshot()
                elif (spec.output.save_every and progress["step"] % spec.output.save_every == 0) or time_due:
                    pending = snapshot()
                if stop_now and not stopped:  # a signal during the last step: the run finishes instead
                    signum = signals.received or signal.SIGTERM
                    if not spike:
                        save("last", snapshot())
                    # Rank 0 reports (after its checkpoint write lands); the other ranks stop silently.
                    message = _interrupted_message(signum, progress, saved_checkpoint()) if main_process else ""
                    raise lifecycle.Interrupted(signum, message)
                if stopped or end_of_epoch:
                    break  # a new epoch needs its own schedule (the outer loop draws it)
    except BaseException:  # diverged, interrupted, crashed: finish the checkpoint write, close the wandb run
        if writer is not None:
            with contextlib.suppress(Exception):  # the original error is the one to report
                writer.wait()
        logger.finish()
        raise
    finally:
        console.close()
    if evaluated_at != progress["step"] and progress["best"] is None:
        evaluate()
        save("last", snapshot())
    if writer is not None:
        writer.wait()
    result = {}
    if main_process:
        best = progress["best_metrics"] or {}
        extra = start.final_blocks(record, best) if start is not None else {}
        result = _finish(
            run_dir, name, task_label, config, record, progress, best, device, objectives, steps_per_epoch, extra
        )
        logger.summary(
            {
                "best/selection_score": progress["best"],
                "best/step": progress["best_step"],
                "train_seconds": result["train_seconds"],
                "peak_memory_mb": result["peak_memory_mb"],
                "trainable_params": counts["trainable"],
                "total_params": counts["total"],
                **{f"best/{n}/{k}": v for n, m in best.items() for k, v in m.items() if k != "predictions"},
                **_numbers(record.get("start", {}), "start"),
            }
        )
    logger.finish()
    if world > 1:
        dist.barrier()
    return result


def _numbers(block: dict, prefix: str) -> dict[str, float]:
    """The numbers of a nested dict, flattened to `prefix/key/...` (wandb summary keys)."""
    flat = {}
    for key, value in block.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}/{key}"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


def _interrupted_message(signum: int, progress: dict, last: Path | None) -> str:
    saved = json.loads((last.parent / "last.json").read_text())["step"] if last else None
    where = f"checkpoint at step {saved}" if saved is not None else "no checkpoint (nothing healthy to save)"
    return (
        f"interrupted by {signal.Signals(signum).name} at step {progress['step']} "
        f"({progress['epoch']} epoch(s) completed); "
        f"{where}. Continue with the same command plus --resume"
    )


def _finish(
    run_dir: Path,
    name: str,
    task_label: str,
    config,
    record,
    progress,
    best,
    device,
    objectives,
    steps_per_epoch,
    extra: dict[str, Any],
) -> dict[str, Any]:
    single = len(objectives) == 1
    prefixed = {
        n: {**m, "predictions": {k: f"predictions/{v}" for k, v in m["predictions"].items()}}
        if "predictions" in m
        else m
        for n, m in best.items()
    }
    metrics: dict[str, Any] = dict(next(iter(prefixed.values()))) if single else {"tasks": prefixed}
    metrics.update(
        selection_score=progress["best"],
        best_step=progress["best_step"],
        steps=progress["step"],
        train_seconds=round(progress["train_seconds"], 3),
        peak_memory_mb=round(_peak_memory_mb(device), 1),
        **extra,
    )
    atomic_write_json(run_dir / "metrics.json", metrics)
    args = record["training"]
    primary = next(iter(objectives.values())).metric if single else "selection_score"
    best_value = metrics.get(primary, progress["best"])
    write_runs_row(
        run_dir.parent / "runs.tsv",  # where the folder is now, wherever it was made
        {
            "run": name,
            "task": task_label,
            "variant": variant_tag(config),
            "config_hash": record["config_hash"],
            "seed": args["seed"],
            "lr": args["lr"],
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
    best_epoch = math.ceil(progress["best_step"] / steps_per_epoch) if progress["best_step"] else 0
    print(
        f"done {name}: best {primary} = {best_value:.4f} at step {progress['best_step']} "
        f"(epoch {best_epoch}), {metrics['train_seconds']:.1f} s, "
        f"{record['parameters']['trainable']:,} of {record['parameters']['total']:,} parameters trained -> {run_dir}"
    )
    return metrics
