"""The one generic training loop: objectives (data + head + loss + metric) x one shared backbone.

`train(spec)` takes the run folder (train/run/: its lock, its state, its record) and hands it to a `Trainer`:
`step`, `evaluate` and `save` are its methods, and where it stands is a `Progress`. Single task or
multitask, CPU or GPU, one process or `torchrun --nproc_per_node N` (DDP; gloo on CPU, NCCL on GPU;
batches sharded per rank; only rank 0 evaluates, logs and writes). Checkpoints survive a SIGKILL
(train/run/checkpoint.py) and `--resume` continues bit-for-bit on CPU. This module knows neither the
command line nor the variant registry: it reads a `RunSpec`, and the model says its auxiliary loss
and its variant state itself.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model import GPT2LMHeadModel, load_tokenizer
from model.compile import compile_blocks
from model.files import atomic_write_json
from model.trainable import build_optimizer, hold_frozen_at, set_trainable
from task_data.common import DataError, data_dir
from train.base import console
from train.base.settings import MultitaskSettings, TrainingSettings
from train.run import checkpoint as ckpt
from train.run.folder import (
    check_run_folder,
    diverged_note,
    finish_run,
    new_wandb_id,
    owned,
    read_metrics,
    run_folder,
    sync_index,
)
from train.run.log import RunLogger, git_commit, truncate_log
from train.run.spec import RunSpec, identity_schema, variant_tag
from train.run.state import RunFolderError, folder_state
from train.tasks import TASKS, selection_score, task_index
from train.trainer import distributed, graphs, lifecycle
from train.trainer.distributed import device_synchronize
from train.trainer.runtime import autocast_for, resolve_precision

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
        with self.model.for_task(task_index(task)):  # variants that route by task (peft's poly) read it
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


class TrainingLines:
    """Training progress on stderr (train/base/console.py): a tqdm bar on a terminal; otherwise (a log file,
    SLURM) one plain line every `every` steps, and a heartbeat line whenever steps are slower than the
    progress interval. Messages always get their own line."""

    def __init__(self, enabled: bool, total: int, initial: int, every: int) -> None:
        self.enabled, self.total, self.every = enabled, total, every
        self.tty = enabled and console.on_terminal()
        self.phase = console.Phase("training", total, enabled, initial, unit="steps")
        self.start = time.perf_counter()

    def open(self) -> None:
        """Start showing progress (`Trainer.run`; a run that fails to build shows none)."""
        self.phase.__enter__()
        self.start = time.perf_counter()

    def step(self, step: int, epoch: float, values: dict[str, float]) -> None:
        """`epoch`: epochs completed, as a fraction (the same count every other line gives)."""
        if not self.enabled:
            return
        self.phase.set(step)
        if self.tty:
            self.phase.bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['train/tokens_per_s']:.0f}")
        elif self.every and (step % self.every == 0 or step == self.total):
            console.say(
                f"step {step}/{self.total} (epoch {epoch:.2f}) loss {values['train/loss']:.4f} "
                f"lr {values['train/lr']:.3g} tok/s {values['train/tokens_per_s']:.0f} "
                f"elapsed {time.perf_counter() - self.start:.0f}s"
            )

    def message(self, text: str) -> None:
        if self.enabled:
            console.say(text)

    def close(self) -> None:
        self.phase.__exit__(None, None, None)


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


@dataclasses.dataclass
class Progress:
    """Where a run stands; saved in every checkpoint's state.json (as a dict), so --resume continues here."""

    epoch: int = 0  # epochs completed
    position: int = 0  # batches of the current epoch consumed
    step: int = 0  # optimizer steps taken
    best: float | None = None  # the best selection score so far
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best (patience)
    train_seconds: float = 0.0  # the training steps' wall time (evaluations not counted)
    best_metrics: dict | None = None
    eval_seconds: float = 0.0  # the dev evaluations' wall time
    # training is over (the step budget is spent, or patience stopped it): a resume after a crash in the
    # test prediction goes straight back to it instead of training on
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(spec: RunSpec, signals=None, start=None) -> dict:
    """Train the spec's tasks on one backbone; the metrics of the best evaluation. `spec.config` is the
    run's resolved config (validated by the entry point before anything was loaded). `signals`: a
    StopSignals the caller entered (SIGINT / SIGTERM then stop after the current step with a
    checkpoint, raising Interrupted). `start`: a run that begins from another run's trained weights
    (train/cli/transfer.py), with
    - `load(model)`: copy them in, before the task heads are built and anything trains;
    - `before_training(model, objectives, device, autocast, shard) -> dict`: blocks (e.g. the zero-shot
      metrics) computed once on the starting weights and kept in config.json (a resumed run keeps them);
    - `final_blocks(record, best_metrics) -> dict`: blocks added to metrics.json."""
    signals = signals or lifecycle.StopSignals()
    placement = distributed.setup(spec.runtime.device)
    run_dir = run_folder(spec, migrate=placement.main)  # rank 0 migrates a legacy folder ...
    if placement.world > 1:
        dist.barrier()  # ... before any rank reads it
    existed = run_dir.is_dir()  # (taking the lock creates it)
    if placement.world > 1:
        dist.barrier()  # every rank looked before rank 0 takes the lock
    with owned(run_dir, placement.main):  # one writer for the folder's whole life (train/run/folder.py)
        state = folder_state(run_dir)
        saved_record = check_run_folder(run_dir, state, spec, placement.main, existed)
        if saved_record is not None and state == "finished" and not spec.output.extend_epochs:
            metrics = read_metrics(run_dir)
            if placement.main:
                sync_index(run_dir)  # a run killed after its metrics.json gets its runs.tsv row now
                print(
                    f"{run_dir} is already finished (selection score {metrics.get('selection_score')} at step "
                    f"{metrics.get('best_step')}); nothing to do. --resume --extend_epochs N trains it further."
                )
            return metrics
        if signals.received is not None:
            raise lifecycle.Interrupted(signals.received, "interrupted before training started; nothing to save")
        resume = spec.output.resume and state in ("interrupted", "finished")
        with console.phase(f"starting {run_dir.name}", enabled=placement.main):
            trainer = Trainer(spec, run_dir, placement, saved_record if resume else None, signals, start)
        return trainer.run()


class Trainer:
    """One run's training: built from its spec (model, heads, optimizer, schedule, record), resumed
    from its last checkpoint when `saved_record` is given, then `run()`."""

    def __init__(self, spec: RunSpec, run_dir: Path, placement, saved_record: dict | None, signals, start) -> None:
        self.spec, self.run_dir, self.signals, self.start = spec, run_dir, signals, start
        if placement.device.startswith("cuda"):  # this run's peak, not an earlier run's in the same process
            torch.cuda.reset_peak_memory_stats(placement.device)
        self.test_block: dict[str, Any] = {}  # metrics.json's test_predictions_step and test_seconds
        self.rank, self.world, self.device = placement.rank, placement.world, placement.device
        self.main = placement.main
        self.training = training = spec.training
        self.checkpoints = run_dir / "checkpoints"
        self.mixture = spec.settings_of("multitask")
        # fp32 matmuls use TF32 (entry.execute: cuda_kernel_settings)
        self.precision = resolve_precision(spec.runtime.precision, self.device)
        saved_precision = (saved_record or {}).get("precision")
        if saved_precision not in (None, self.precision):  # precision is not in the identity: keep a run's own
            raise RunFolderError(
                f"--resume: {run_dir.name} computed in {saved_precision}, this resume would compute in "
                f"{self.precision}; pass --precision {saved_precision}"
            )
        check_loss_precision(saved_record, self.precision, spec.runtime.loss_precision, run_dir.name)
        extra_epochs = ((saved_record or {}).get("extra_epochs") or 0) + (spec.output.extend_epochs or 0)
        self.epochs = training.epochs + extra_epochs
        self._build_objectives()
        self.resuming = saved_record is not None
        self._build_model()
        self.steps_per_epoch = math.ceil(len(self.schedule(0)) / training.grad_accum)
        self.total_steps = training.max_steps or self.steps_per_epoch * self.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(training.schedule, training.warmup, self.total_steps)
        )
        self.trainable = {n: p for n, p in self.task_model.named_parameters() if p.requires_grad}
        # checkpoints hold the trainable weights plus frozen variant state a rebuild would not reproduce
        frozen = {f"model.{k}": v for k, v in self.model.variant_state(checkpoints_only=True).items()}
        self.checkpointed = {**self.trainable, **frozen}
        self.record = self._new_record(extra_epochs)
        self.autocast = autocast_for(self.device, self.precision)
        self.autocast_static = autocast_for(self.device, self.precision, cache=False)  # no cache baked into a graph
        if start is not None:
            if saved_record is not None and "start" in saved_record:
                self.record["start"] = saved_record["start"]
            else:
                self.record["start"] = start.before_training(
                    self.model, self.objectives, self.device, self.autocast, (self.rank, self.world)
                )
        self.progress = Progress()
        if saved_record is not None:
            self._resume(saved_record)
        elif self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", self.record)
        self.logger = self._logger(replay=saved_record is not None)
        self.console = TrainingLines(self.main, self.total_steps, self.progress.step, spec.output.log_every)
        if self.fast and self.not_captured is not None and self.main:
            self.console.message(f"fast step: static shapes, eager (no CUDA graphs: {self.not_captured})")
        self.task_weights = dict(self.mixture.task_weights) if self.mixture is not None else {}
        self.captured = None  # CapturedSteps, made after the first (eager) step measured no host sync
        # Under torchrun rank 0 writes on a thread, so the other ranks never wait in a collective for its disk.
        self.writer = ckpt.BackgroundWriter() if self.world > 1 and self.main else None
        self.guard = lifecycle.DivergenceGuard(
            spec.output.spike_factor, spec.output.blowup_factor, floor=math.log(spec.config.vocab_size)
        )
        self.last_save = time.monotonic()
        self.tokens_since = 0

    # ---- construction ----
    def _build_objectives(self) -> None:
        spec, config = self.spec, self.spec.config
        console.doing("reading and tokenising the data")
        tokenizer = load_tokenizer(spec.output.tokenizer)
        folder = data_dir(spec.output.data_dir)
        self.fast = spec.runtime.fast_step == "on"
        self.objectives = {
            # input_positions: n_positions less prompt learning's virtual tokens
            name: TASKS[name](
                tokenizer,
                folder,
                spec.training,
                config.input_positions,
                spec.settings_of(name),
                graphs.EvaluationGraphs(name) if self.fast else None,
                predict_test=spec.output.predict_test,
            )
            for name in spec.tasks
        }
        for objective in self.objectives.values():
            objective.check_training_data()  # e.g. a --train_fraction missing a label: refused before weights load
            objective.check_token_ids(config.vocab_size)  # once here, so no training step checks (or syncs)

    def _build_model(self) -> None:
        spec, config, device = self.spec, self.spec.config, self.device
        torch.manual_seed(spec.training.seed)
        random.seed(spec.training.seed)
        console.doing("loading the model")
        model = GPT2LMHeadModel.from_pretrained(spec.checkpoint.source, config=config).to(device)
        if model.config != config:
            raise RuntimeError(f"the loaded model's config differs from the validated one: {model.config} vs {config}")
        if self.start is not None:
            self.start.load(model)
        self.data_init_seconds = None
        # not on resume (the weights come from the checkpoint), nor on a transfer start (from the source run)
        if model.needs_data_init and not self.resuming and self.start is None:
            self.data_init_seconds = self._initialize_from_data(model)
        heads = {n: h.to(device) for n, obj in self.objectives.items() if (h := obj.make_head(model)) is not None}
        self.counts = set_trainable(model, config.fine_tune_mode, heads.values())
        if self.precision == "bf16":  # frozen block linears held in bf16: autocast stops re-casting them each step
            hold_frozen_at(model, torch.bfloat16)
        if spec.runtime.grad_checkpointing:
            model.transformer.gradient_checkpointing = True
        model.lm_loss_fp32 = spec.runtime.loss_precision == "fp32"
        model.use_kan_kernel(spec.runtime.kan_kernel, device)
        self.model, self.heads = model, heads
        self.task_model = TaskModel(model, heads, self.objectives, device)
        self.wrapped: nn.Module = self.task_model
        if self.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.task_model, find_unused_parameters=len(self.objectives) > 1
            )
            # Every rank built the same weights from the run's seed; dropout now gets its own stream per rank.
            torch.manual_seed(distributed.rank_seed(spec.training.seed, self.rank))
        # The fast step (train/trainer/graphs.py): static shapes always; the whole step as CUDA graphs where it can.
        self.static_rows = spec.training.batch_size if self.fast else None
        self.step_hooks = model.has_step_hooks
        self.not_captured = (
            graphs.why_not_captured(
                device,
                self.world,
                spec.training.grad_accum,
                spec.runtime.grad_checkpointing,
                len(self.objectives),
                dropout=graphs.uses_dropout(model, heads.values()),
                step_hooks=model.has_step_hooks,
                model_reason=model.capture_blocker,
            )
            if self.fast
            else None
        )
        self.capture = self.fast and self.not_captured is None
        if spec.runtime.compile:
            compile_blocks(model, static_shapes=self.fast)
        self.fused = {"fused": True} if device.startswith("cuda") else {}  # one kernel for all parameters
        if self.capture:
            self.fused["capturable"] = True  # its step count and lr live on the device, so a graph can hold it
        self.optimizer = build_optimizer(
            model, spec.training.lr, spec.training.weight_decay, heads=heads.values(), **self.fused
        )

    def _initialize_from_data(self, model: nn.Module) -> float:
        """A variant's data-driven init (EVA) on the first `peft_init_batches` training batches of the
        first task, drawn with the run's seed (the same on every process, so every rank agrees)."""
        spec = self.spec
        task, objective = next(iter(self.objectives.items()))
        order = objective.batches(0, spec.training.batch_size, spec.training.seed)[: spec.config.peft_init_batches]
        batches = []
        for batch in order:
            inputs = objective.inputs(batch)
            batches.append({k: inputs[k].to(self.device) for k in ("input_ids", "attention_mask")})
        rank = max(1, int((spec.config.peft_config or {}).get("r", 8)))
        tokens = min(int(b["attention_mask"].sum()) for b in batches)
        if tokens < rank:  # peft's incremental SVD skips such batches and would cycle them forever
            raise DataError(
                f"EVA needs at least r={rank} real tokens per batch to find r directions; a batch of {task} has "
                f"{tokens}: raise --batch_size"
            )
        started = time.perf_counter()
        model.initialize_from_data(batches)
        seconds = time.perf_counter() - started
        if self.main:
            print(f"data-driven init from {len(batches)} {task} training batches: {seconds:.1f} s", file=sys.stderr)
        return seconds

    def _new_record(self, extra_epochs: int) -> dict[str, Any]:
        spec, config = self.spec, self.spec.config
        return {
            "task": spec.label,
            "run": self.run_dir.name,
            "grid": spec.output.wandb_group,
            "label": spec.output.label or variant_tag(config),
            "config": {**config.to_dict(), "fine_tune_mode": config.resolved_fine_tune_mode},
            "variants": [v.name for v in config.variants],
            "training": spec.flat_settings(),
            "identity": spec.identity(),
            "spec": spec.to_json(),
            "command": list(spec.argv),
            "config_hash": spec.identity_hash(),
            "identity_schema": identity_schema(),  # what the name was made under (train/run/spec.py)
            "wandb_id": new_wandb_id(spec),
            "git_commit": git_commit(),
            "parameters": self.counts,
            "world_size": self.world,
            "device": self.device,
            # CPU float sums are split across threads: a result depends on their count (checked on resume)
            "cpu_threads": torch.get_num_threads() if self.device == "cpu" else None,
            "precision": self.precision,  # what --precision auto resolved to on this device
            "extra_epochs": extra_epochs,
            "data_init_seconds": self.data_init_seconds,  # a variant's init from training data (EVA)
        }

    def _resume(self, saved_record: dict) -> None:
        spec, record = self.spec, self.record
        folder = ckpt.checkpoint_folder(self.checkpoints, "last")
        record["wandb_id"] = saved_record.get("wandb_id", record["wandb_id"])  # the same wandb run continues
        if self.data_init_seconds is None:  # the run's own data-driven init (not redone on resume)
            record["data_init_seconds"] = saved_record.get("data_init_seconds")
        record["command"] = saved_record.get("command", record["command"])
        record["resumed_with"] = list(spec.argv)
        if "migrated_from" in saved_record:
            record["migrated_from"] = saved_record["migrated_from"]
        saved_threads = saved_record.get("cpu_threads")
        if self.main and saved_threads not in (None, record["cpu_threads"]) and record["cpu_threads"] is not None:
            print(
                f"warning: {self.run_dir.name} trained with {saved_threads} CPU thread(s), this resume uses "
                f"{record['cpu_threads']}: sums split differently, so its weights will not be bit-identical to an "
                f"uninterrupted run (OMP_NUM_THREADS={saved_threads} matches it)",
                file=sys.stderr,
            )
            record["cpu_threads_on_resume"] = record["cpu_threads"]
            record["cpu_threads"] = saved_threads
        weights, state_json, tensors = ckpt.load_checkpoint(folder)
        missing = sorted(set(self.trainable) - set(weights))
        if missing:
            raise ckpt.CheckpointCorrupt(f"--resume: checkpoint {folder} lacks trainable weights {missing[:5]}")
        try:  # the files parse and their schema holds (load_checkpoint); here they must fit this model
            ckpt.copy_into(self.checkpointed, weights, folder)
            ckpt.restore_optimizer(self.optimizer, state_json, tensors)
            self.model.load_training_state(*ckpt.saved_variant_state(state_json, tensors))
            for group in self.optimizer.param_groups:  # how this run steps, not how the saving run did
                group.update({key: value for key, value in self.fused.items() if key in ("fused", "capturable")})
            lambdas = [None] * len(self.optimizer.param_groups)
            self.scheduler.load_state_dict({**state_json["scheduler"], "lr_lambdas": lambdas})
            restored = ckpt.restore_rng(tensors, state_json["rng"], self.rank, self.device)
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as error:
            if isinstance(error, torch.OutOfMemoryError) or "CUDA" in str(error):
                raise  # the device, not the checkpoint
            raise ckpt.CheckpointCorrupt(
                f"--resume: checkpoint {folder} does not fit this run ({type(error).__name__}: {error})"
            ) from None
        if not restored:
            print(
                f"rank {self.rank}: the checkpoint has no RNG state for this rank (fewer processes wrote it); "
                "its streams start from the rank's seed",
                file=sys.stderr,
            )
        known = {f.name for f in dataclasses.fields(Progress)}
        self.progress = Progress(**{k: v for k, v in state_json["progress"].items() if k in known})
        progress = self.progress
        if spec.output.extend_epochs:
            progress.bad_evals, progress.stopped = 0, False  # patience counts afresh in the added epochs
        if not self.main:
            return
        dropped, unreadable = truncate_log(self.run_dir / "log.jsonl", progress.step)
        print(
            f"resuming {self.run_dir.name} from step {progress.step} ({progress.epoch} epoch(s) completed)"
            + (f"; dropped {dropped} log line(s) written after that checkpoint" if dropped else ""),
            file=sys.stderr,
        )
        if unreadable:  # their values are gone: the steps before the checkpoint are not run again
            print(
                f"warning: {unreadable} line(s) of {self.run_dir / 'log.jsonl'} could not be read (cut by a crash or "
                f"damaged) and were dropped: steps after {progress.step} are logged again as they run, the values "
                f"of earlier steps those lines held are lost",
                file=sys.stderr,
            )
        if spec.output.extend_epochs:
            training = spec.training
            old_lr = self.scheduler.get_last_lr()[0]
            new_lr = training.lr * lr_lambda(training.schedule, training.warmup, self.total_steps)(progress.step)
            print(
                f"extending by {spec.output.extend_epochs} epoch(s) to {self.epochs}: training continues to step "
                f"{self.total_steps}; the {training.schedule} schedule is re-planned over {self.total_steps} steps, "
                f"so the lr goes from {old_lr:.3g} to {new_lr:.3g} at step {progress.step}",
                file=sys.stderr,
            )
        if note := diverged_note(self.run_dir):
            print(note, file=sys.stderr)
        if spec.output.extend_epochs and (self.run_dir / "metrics.json").exists():
            # The run is unfinished again until the extension ends: its old metrics move aside first,
            # then config.json records the extension, so an interrupted extension is an interrupted run
            # whose plain --resume finishes exactly it (a kill between the two leaves the old length)
            steps = read_metrics(self.run_dir).get("steps", "unknown")  # one file per extension, none overwritten
            os.replace(self.run_dir / "metrics.json", self.run_dir / f"metrics.before-extension-{steps}-steps.json")
        atomic_write_json(self.run_dir / "config.json", record)

    def _logger(self, replay: bool) -> RunLogger:
        """log.jsonl and wandb. wandb groups what the report groups: the grid and task (or the task), the
        configuration hash and its label in the config, the method in the tags (`peft-vera`), a grid's
        stage (tune / final) as the job type, the chosen rate and its tuning runs in the config."""
        spec, record = self.spec, self.record
        grid = spec.output.wandb_group
        logger = RunLogger(
            self.run_dir,
            self.run_dir.name,
            record["wandb_id"],
            f"{grid}-{spec.label}" if grid else spec.label,
            [spec.label, *wandb_tags(spec.config)],
            {
                **record["config"],
                **record["training"],
                "task": spec.label,
                "grid": grid,
                "run": self.run_dir.name,
                "config_hash": record["config_hash"],
                "label": record["label"],
            },
            spec.output.wandb,
            spec.output.wandb_project,
            enabled=self.main,
            job_type=spec.output.stage,
        )
        if replay:  # steps a killed process logged to log.jsonl but wandb may have lost
            logger.replay(self.progress.step)
        return logger

    # ---- the pieces of a run ----
    def schedule(self, epoch: int) -> list[tuple[str, list[int]]]:
        return epoch_schedule(self.objectives, self.training, epoch, self.rank, self.world, self.mixture)

    def step_loss(self, task: str, inputs: dict[str, torch.Tensor], autocast_context) -> torch.Tensor:
        with autocast_context:
            loss = self.wrapped(task, inputs) * self.task_weights.get(task, 1.0)
            if (extra := self.model.auxiliary_loss()) is not None:  # e.g. the KAN regulariser
                loss = loss + extra
        return loss

    def save(self, kind: str, snapshot: tuple | None = None) -> None:
        """Write a checkpoint of the current weights; `snapshot` = (progress, every rank's RNG) recorded
        at the end of the step those weights belong to (all ranks call snapshot() together). Without
        one (the "best" checkpoint, rank 0 only), rank 0's RNG is recorded."""
        if self.main:
            saved_progress, rng = snapshot or (self.progress.to_dict(), None)
            ckpt.save_checkpoint(
                self.checkpoints,
                kind,
                saved_progress["step"],
                self.checkpointed,
                self.optimizer,
                self.scheduler,
                saved_progress,
                rng,
                self.writer,
                self.model.training_state(),
            )
        self.last_save = time.monotonic()

    def snapshot(self) -> tuple:
        return copy.deepcopy(self.progress.to_dict()), _gathered_rng(self.world, self.device)

    def saved_checkpoint(self) -> Path | None:
        if self.writer is not None:
            self.writer.wait()
        return ckpt.checkpoint_folder(self.checkpoints, "last")

    def evaluate(self) -> bool:
        """Every rank scores its share of dev (gathered); rank 0 logs, keeps the best predictions and
        checkpoint, and decides early stopping, which is broadcast to every rank. True: stop."""
        progress, staging = self.progress, self.run_dir / ".predictions.tmp"
        if self.main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        self.task_model.eval()
        metrics = {}
        for n, obj in self.objectives.items():
            with self.autocast, self.model.for_task(task_index(n)):  # the run's precision; the task's route
                metrics[n] = obj.evaluate(
                    self.model,
                    self.heads.get(n),
                    staging if self.main else None,
                    self.device,
                    self.spec.output.eval_train,
                    (self.rank, self.world),
                )
        self.task_model.train()
        stop = False
        if self.main:
            score = selection_score(metrics)
            flat = {f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items() if k != "predictions"}
            self.logger.log({**flat, "dev/selection_score": score, "epoch": progress.epoch}, progress.step)
            improved = progress.best is None or score > progress.best
            line = _metrics_line(progress.step, progress.step / self.steps_per_epoch, metrics, score, improved)
            self.console.message(line)
            if improved:
                progress.best, progress.best_step, progress.bad_evals = score, progress.step, 0
                progress.best_metrics = metrics
                shutil.rmtree(self.run_dir / "predictions", ignore_errors=True)
                os.replace(staging, self.run_dir / "predictions")
                self.save("best")
            else:
                progress.bad_evals += 1
                shutil.rmtree(staging, ignore_errors=True)
            stop = bool(self.training.patience) and progress.bad_evals >= self.training.patience
        if self.world > 1:
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        return stop

    def timed_evaluation(self) -> tuple[bool, float]:
        """`evaluate()` (True: stop) and the seconds it took, added to the run's `eval_seconds`."""
        started = time.perf_counter()
        stop = self.evaluate()
        spent = time.perf_counter() - started
        self.progress.eval_seconds += spent
        return stop, spent

    def predict_test(self) -> None:
        """The test split, predicted once at the end from the best checkpoint's weights (every rank its
        share; rank 0 writes the files beside the best dev predictions). A tuning run predicts none."""
        progress = self.progress
        # rank 0 keeps the best metrics: it decides, and every rank follows (they predict together)
        decision = [self.spec.output.predict_test and progress.best_metrics is not None, progress.best_step]
        if self.world > 1:
            dist.broadcast_object_list(decision, src=0)
        wanted, best_step = decision
        if not wanted:
            return
        source = progress.step
        if best_step != progress.step:  # the weights in memory are not the best ones
            source = self._load_best(best_step)
        if self.main:
            whose = "the best" if source == best_step else f"the last: step {best_step}'s were not found"
            console.say(f"predicting the test split with the weights of step {source} ({whose})")
        started = time.perf_counter()
        folder = self.run_dir / "predictions" if self.main else None
        self.task_model.eval()

        # Training is over and checkpointed: a signal now stops the prediction at once (--resume redoes it)
        def stopped_message(signum: int) -> str:  # rank 0 reports; the other ranks stop silently
            return _interrupted_message(signum, progress, self.saved_checkpoint()) if self.main else ""

        with self.signals.at_once(stopped_message):
            for n, obj in self.objectives.items():
                with self.autocast, self.model.for_task(task_index(n)):  # the run's precision; the task's route
                    shard = (self.rank, self.world)
                    files = obj.test_predictions(self.model, self.heads.get(n), folder, self.device, shard)
                if files:  # (rank 0 only: the rank that writes)
                    progress.best_metrics[n].setdefault("predictions", {}).update(files)
        self.task_model.train()
        self.test_block = {"test_predictions_step": source, "test_seconds": round(time.perf_counter() - started, 3)}

    def _load_best(self, best_step: int) -> int:
        """Put the best checkpoint's trainable weights (and variant state) into the model; the step whose
        weights the model now holds (the current one, with a warning, when there is no best checkpoint;
        the checkpoint's own, with a warning, when it is not `best_step`'s)."""
        if self.writer is not None:
            self.writer.wait()
        if self.world > 1:
            dist.barrier()  # rank 0's best checkpoint is on disk before any rank reads it
        folder = ckpt.checkpoint_folder(self.checkpoints, "best")
        if folder is None:
            if self.main:
                console.say(f"warning: no best checkpoint was found (step {best_step}'s): using the last weights")
            return self.progress.step
        weights, state_json, tensors = ckpt.load_checkpoint(folder)
        try:
            ckpt.copy_into(self.checkpointed, weights, folder)
            self.model.load_training_state(*ckpt.saved_variant_state(state_json, tensors))
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as error:
            if isinstance(error, torch.OutOfMemoryError) or "CUDA" in str(error):
                raise
            raise ckpt.CheckpointCorrupt(
                f"best checkpoint {folder} does not fit this run ({type(error).__name__}: {error})"
            ) from None
        if state_json["step"] != best_step and self.main:
            console.say(f"warning: the best checkpoint holds step {state_json['step']}, not step {best_step}")
        return state_json["step"]

    def diverged(self, task: str, value: float, reason: str) -> lifecycle.TrainingDiverged:
        last = self.saved_checkpoint()
        step = self.progress.step + 1
        info = {"step": step, "task": task, "loss": value if math.isfinite(value) else str(value), "reason": reason}
        if not self.main:  # rank 0 reports; another rank could read the pointer before rank 0's write lands
            return lifecycle.TrainingDiverged("")
        atomic_write_json(self.run_dir / "diverged.json", info)
        self.logger.log({"diverged": reason, "epoch": self.progress.epoch}, step)
        return lifecycle.TrainingDiverged(
            f"training diverged at step {step} on task {task}: {reason}; stopped. The last "
            f"healthy checkpoint is kept: {last or 'none saved yet'}"
        )

    def _judge(self, group: list, loss_values: list[float], grad_norm: float) -> str | None:
        """Stop on a non-finite loss or gradient norm; a spike (the guard's) is returned to the caller."""
        spike = None
        for (task, _), value in zip(group, loss_values, strict=True):
            verdict = self.guard.check(task, value)
            if verdict is not None and verdict[1]:  # non-finite or blown up: nothing after this is kept
                raise self.diverged(task, value, verdict[0])
            spike = spike or (verdict[0] if verdict else None)
        if not math.isfinite(grad_norm):  # clipping would write NaN into the weights
            raise self.diverged(group[-1][0], loss_values[-1], f"non-finite gradient norm ({grad_norm})")
        return spike

    def step(self, group: list, pending: tuple | None) -> tuple[list[float], float, str | None]:
        """One optimizer step over `group` ((task, batch) micro-batches): (losses, gradient norm, spike).
        `pending`: a checkpoint due at the previous step, written now if this step's loss shows its
        weights are healthy (not, when it spiked). The step is a CUDA-graph replay once one is captured
        (and no checkpoint waits on it), else eager."""
        if self.captured is not None and pending is None:
            replayed = self._replayed_step(group)
            if replayed is not None:
                return replayed
        return self._eager_step(group, pending)

    def _replayed_step(self, group: list) -> tuple[list[float], float, str | None] | None:
        """The whole step as one graph replay (train/trainer/graphs.py); None when replaying failed (eager from
        now on). AdamW skipped itself on the device if the loss or gradient norm is not finite, so the
        verdict still stops with healthy weights."""
        ((task, batch),) = group
        try:
            loss_t, norm_t = self.captured.step(task, self.objectives[task].inputs(batch, self.static_rows))
        except RuntimeError as error:  # e.g. an op a CUDA graph cannot hold
            self.console.message(f"fast step: capturing failed ({str(error).splitlines()[0][:200]}); eager")
            self.captured, self.capture = None, False
            return None
        loss_value, grad_norm = torch.stack([loss_t, norm_t]).tolist()  # the step's one sync
        self.tokens_since += self.objectives[task].batch_tokens(batch)
        spike = self._verdict(group, [loss_value], grad_norm, None)
        self.scheduler.step()
        return [loss_value], grad_norm, spike

    def _eager_step(self, group: list, pending: tuple | None) -> tuple[list[float], float, str | None]:
        """Forward and backward per micro-batch, clipping, the verdict (and the pending checkpoint), the
        optimizer and the variants' step hooks; the first eager step of a fast run decides capture."""
        losses = []
        syncs = graphs.SyncCounter() if self.capture and self.captured is None else None
        for index, (task, batch) in enumerate(group):
            inputs = {k: v.to(self.device) for k, v in self.objectives[task].inputs(batch, self.static_rows).items()}
            # DDP all-reduces gradients on the last micro-batch only
            last_micro = index == len(group) - 1 or self.world == 1
            with contextlib.nullcontext() if last_micro else self.wrapped.no_sync():
                with syncs if syncs is not None else contextlib.nullcontext():
                    loss = self.step_loss(task, inputs, self.autocast)
                    (loss / len(group)).backward()
            losses.append(loss.detach().float())
            self.tokens_since += self.objectives[task].batch_tokens(batch)
        norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.training.max_grad_norm)
        # The step's one host sync: every micro-batch loss and the gradient norm at once.
        *loss_values, grad_norm = torch.stack([*losses, norm.float().to(losses[0].device)]).tolist()
        spike = self._verdict(group, loss_values, grad_norm, pending)
        self.optimizer.step()
        if self.step_hooks:  # e.g. AdaLoRA's rank allocator: it reads the gradients, so before zero_grad
            self.model.after_optimizer_step(self.progress.step, self.total_steps)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.capture)  # captured graphs keep the .grad tensors
        if syncs is not None:
            self._capture_after(syncs)
        return loss_values, grad_norm, spike

    def _verdict(self, group: list, loss_values: list[float], grad_norm: float, pending: tuple | None) -> str | None:
        """Judge the step (`_judge` raises when the run must stop); a spike is reported, and the pending
        checkpoint, whose weights gave this step, is written only when the step was healthy."""
        spike = self._judge(group, loss_values, grad_norm)
        if pending is not None and not spike:
            self.save("last", pending)
        elif pending is not None:
            self.console.message(
                f"step {self.progress.step + 1}: {spike}; the checkpoint of step {pending[0]['step']} "
                f"(whose weights gave it) is not kept"
            )
        elif spike:
            self.console.message(f"step {self.progress.step + 1}: {spike}")
        return spike

    def _capture_after(self, syncs: graphs.SyncCounter) -> None:
        """After the first eager step of a fast run: capture the step as CUDA graphs if it never synced."""
        if syncs.total:
            self.capture = False
            self.console.message(
                "fast step: static shapes, eager (no CUDA graphs: this variant's layers sync with "
                f"the host {syncs.total} time(s) per step: {dict(syncs.counts)})"
            )
            return
        self.captured = graphs.CapturedSteps(
            lambda task, inputs: self.step_loss(task, inputs, self.autocast_static),
            list(self.trainable.values()),
            self.optimizer,
            self.training.max_grad_norm,
            self.device,
            graphs.step_generators(self.model, *self.heads.values()),
        )

    # ---- the run ----
    def run(self) -> dict:
        try:
            self.console.open()
            evaluated_at = self._loop()
            if evaluated_at != self.progress.step and self.progress.best is None:
                self.timed_evaluation()
                self.progress.stopped = True
                self.save("last", self.snapshot())
            self.predict_test()
        except BaseException as error:  # diverged, interrupted, crashed: finish the checkpoint write, close wandb
            if self.writer is not None:
                with contextlib.suppress(Exception):  # the original error is the one to report
                    self.writer.wait()
            self.logger.finish(exit_code=_exit_code(error))
            raise
        finally:
            self.console.close()
        if self.writer is not None:
            self.writer.wait()
        result = self._finish() if self.main else {}
        self.logger.finish()
        if self.world > 1:
            dist.barrier()
        return result

    def _loop(self) -> int | None:
        """The epochs and steps; returns the step of the last evaluation."""
        progress, training, output = self.progress, self.training, self.spec.output
        self.wrapped.train()
        start_time = time.perf_counter() - progress.train_seconds
        clock = time.perf_counter()
        pending = None  # a checkpoint due at the previous step, written once this step shows its weights healthy
        stopped = progress.stopped or progress.step >= self.total_steps
        evaluated_at = None
        while not stopped and progress.epoch < self.epochs:
            schedule = self.schedule(progress.epoch)
            while progress.position < len(schedule):
                group = schedule[progress.position : progress.position + training.grad_accum]
                loss_values, grad_norm, spike = self.step(group, pending)
                pending = None  # written by the step, or dropped when its loss spiked
                progress.position += len(group)
                progress.step += 1
                device_synchronize(self.device)  # the clock must see the step finish on the device
                elapsed = time.perf_counter() - clock
                values = {
                    "train/loss": loss_values[-1],
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": self.tokens_since * self.world / max(elapsed, 1e-9),
                    "epoch": progress.epoch,
                }
                if self.main:
                    self.logger.log(values, progress.step)
                self.console.step(progress.step, progress.step / self.steps_per_epoch, values)
                self.tokens_since, clock = 0, time.perf_counter()
                progress.train_seconds = time.perf_counter() - start_time
                end_of_epoch = progress.position >= len(schedule)
                if end_of_epoch:
                    progress.epoch, progress.position = progress.epoch + 1, 0
                last_step = progress.step >= self.total_steps or progress.epoch >= self.epochs
                time_due = (
                    bool(output.save_every_minutes)
                    and time.monotonic() - self.last_save >= 60 * output.save_every_minutes
                )
                flags = [self.signals.received is not None, time_due]
                stop_now, time_due = _all_ranks_any(flags, self.world, self.device)
                if (
                    (training.eval_every and progress.step % training.eval_every == 0)
                    or (not training.eval_every and end_of_epoch)
                    or last_step
                ):
                    stop, spent = self.timed_evaluation()
                    stopped = stop or last_step
                    evaluated_at = progress.step
                    start_time += spent  # neither the training time nor the next step's tokens/s count it
                    clock += spent
                    if stopped:
                        progress.stopped = True  # in the checkpoint: a resume does not train on
                        self.save("last", self.snapshot())
                    else:
                        pending = self.snapshot()
                elif (output.save_every and progress.step % output.save_every == 0) or time_due:
                    pending = self.snapshot()
                if stop_now and not stopped:  # a signal during the last step: the run finishes instead
                    signum = self.signals.received or signal.SIGTERM
                    if not spike:
                        self.save("last", self.snapshot())
                    # Rank 0 reports (after its checkpoint write lands); the other ranks stop silently.
                    message = _interrupted_message(signum, progress, self.saved_checkpoint()) if self.main else ""
                    raise lifecycle.Interrupted(signum, message)
                if stopped or end_of_epoch:
                    break  # a new epoch needs its own schedule (the outer loop draws it)
        return evaluated_at

    def _finish(self) -> dict:
        progress, record = self.progress, self.record
        best = progress.best_metrics or {}
        extra = self.start.final_blocks(record, best) if self.start is not None else {}
        extra = {"eval_seconds": round(progress.eval_seconds, 3), **self.test_block, **extra}
        result = finish_run(self.run_dir, self.spec, record, progress, best, self.device, self.objectives, extra)
        best_epoch = progress.best_step / self.steps_per_epoch if progress.best_step else 0.0
        counts = record["parameters"]
        print(
            f"done {self.run_dir.name}: best {result['metric']} = {result['best_value']:.4f} at step "
            f"{progress.best_step} (epoch {best_epoch:.2f}), {result['train_seconds']:.1f} s of training, "
            f"{counts['trainable']:,} of {counts['total']:,} parameters trained -> {self.run_dir}"
        )
        self.logger.summary(
            {
                "best/selection_score": progress.best,
                "best/step": progress.best_step,
                "train_seconds": result["train_seconds"],
                "peak_memory_mb": result["peak_memory_mb"],
                "trainable_params": counts["trainable"],
                "total_params": counts["total"],
                "run_state": "finished",
                **{f"best/{n}/{k}": v for n, m in best.items() for k, v in m.items() if k != "predictions"},
                **_numbers(record.get("start", {}), "start"),
            }
        )
        return result


def check_loss_precision(saved_record: dict | None, precision: str, loss_precision: str, name: str) -> None:
    """A resumed bf16 run keeps the LM-head loss maths it started with (not part of the identity, like
    --precision). Runs recorded before --loss_precision existed computed that loss in fp32."""
    if saved_record is None or precision != "bf16":
        return  # in fp32 both settings are the same maths
    saved = saved_record.get("training", {}).get("loss_precision", "fp32")
    if saved != loss_precision:
        raise RunFolderError(
            f"--resume: {name} computed its LM-head loss with --loss_precision {saved}, this resume would use "
            f"{loss_precision}; pass --loss_precision {saved}"
        )


def wandb_tags(config) -> list[str]:
    """One tag per enabled variant; a peft method by its name (`peft-vera`), so wandb can tell them apart."""
    tags = [f"peft-{config.peft_method}" if v.name == "peft" else v.name for v in config.variants]
    return tags or ["base"]


def _exit_code(error: BaseException) -> int:
    """The exit status the run ends with, for wandb (an interrupted run is not a finished one)."""
    if isinstance(error, lifecycle.Interrupted):
        return error.exit_status
    if isinstance(error, lifecycle.TrainingDiverged):
        return lifecycle.EXIT_DIVERGED
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C
        return lifecycle.EXIT_STATUS[signal.SIGINT]
    return 1


def _numbers(block: dict, prefix: str) -> dict[str, float]:
    """The numbers of a nested dict, flattened to `prefix/key/...` (wandb summary keys)."""
    flat = {}
    for key, value in block.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}/{key}"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}/{key}"] = value
    return flat


def _interrupted_message(signum: int, progress: Progress, last: Path | None) -> str:
    saved = json.loads((last.parent / "last.json").read_text())["step"] if last else None
    where = f"checkpoint at step {saved}" if saved is not None else "no checkpoint (nothing healthy to save)"
    return (
        f"interrupted by {signal.Signals(signum).name} at step {progress.step} "
        f"({progress.epoch} epoch(s) completed); "
        f"{where}. Continue with the same command plus --resume"
    )
