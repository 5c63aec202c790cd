"""How many runs a preset trains, and an estimate of its GPU-hours from measured step times.

    python scripts/grid_cost.py experiments/presets/methods.toml
    python scripts/grid_cost.py experiments/presets/gpt2.toml --model path/to/gpt2   # no hub access

The counts are the grid's own plan (experiments/ablate.py `plan_grid`): the [tune] stage's runs (one per
candidate rate, per method and task), the final runs (one per seed), X-LoRA's. Planning needs the model's
config; without the hub a randomly initialised checkpoint of the same shape plans the same runs (`--model`,
or one is made in a temporary folder from the size preset `--shape`, default gpt2).

The hours are an estimate: optimizer steps (epochs x ceil(train examples / batch size), or max_steps) times
a step time per method kind, plus one dev pass per epoch (an eval batch of 32 counted as a third of a step)
and the sonnet's generation (160 greedy tokens of the dev and, outside tuning, test prompts at
GENERATION_MS a token). The step times are `scripts/bench_gpu.py`'s eager steps on one H200 (BENCHMARKS.md:
gpt2 shape, bf16, B=32, T=128, random weights). A grid step here is B=8 at up to 512 tokens; at those sizes
the step is launch-bound, so the B=32, T=128 time is used as it is. Methods without a measurement take
LoRA's time and are counted as such in the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from experiments import planning
from task_data.paraphrase import load_paraphrase
from task_data.sentiment import load_sentiment
from task_data.sonnets import load_sonnets
from train.base.settings import TrainingSettings
from train.cli.exits import exit_status
from train.tasks.sonnet import SonnetSettings

# ms per training step, eager, one H200, bench_gpu.py (BENCHMARKS.md, "On one H200", the "after" column)
STEP_MS = {
    "full fine-tuning": 25.9,
    "LoRA": 33.7,
    "DoRA": 62.2,
    "KoRA": 25.4,
    "KAN-FFN (mlp init)": 326.9,
    "LoRA-KAN": 468.3,
    "graph (GATConv) + LoRA": 105.4,
}
GENERATION_MS = 5.0  # per generated token of a batch of 12 prompts (launch-bound; not measured per method)


def kind(argv: list[str]) -> str:
    """The measured step a run's flags correspond to (LoRA's for the methods bench_gpu did not time)."""
    flags = set(argv)
    if "--use_kan" in flags:
        return "LoRA-KAN" if "--use_lora" in flags else "KAN-FFN (mlp init)"
    if "--use_graph" in flags:
        return "graph (GATConv) + LoRA"
    if "--lora_dora" in flags:
        return "DoRA"
    if "--use_kora" in flags:
        return "KoRA"
    if "--use_lora" in flags:
        return "LoRA"
    if any(f.startswith("--use_") for f in flags) or "--peft_method" in flags or "--fine_tune_mode" in flags:
        return "unmeasured (LoRA's time)"
    return "full fine-tuning"


@functools.cache
def examples(task: str, data: Path) -> tuple[int, int]:
    """(training examples, dev examples) of a task, read by the task's own loaders (what a run trains on)."""
    if task == "sonnet":
        return len(load_sonnets("train", data)), len(load_sonnets("dev_prompts", data))
    if task == "quora":
        return len(load_paraphrase("train", data)), len(load_paraphrase("dev", data))
    return len(load_sentiment(task, "train", data)), len(load_sentiment(task, "dev", data))


def run_steps(argv: list[str], data: Path) -> tuple[int, int, int]:
    """(optimizer steps, dev batches, generated tokens) of one run, from its command line (the flags it
    leaves out take their defaults from the settings classes)."""
    defaults = TrainingSettings()
    parser = argparse.ArgumentParser(add_help=False)
    for name in ("epochs", "batch_size", "eval_batch_size", "max_steps", "train_limit", "dev_limit"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--task")
    parser.add_argument("--max_new_tokens", type=int, default=SonnetSettings().max_new_tokens)
    args, _ = parser.parse_known_args(argv)
    train, dev = examples(args.task, data)
    train, dev = min(train, args.train_limit or train), min(dev, args.dev_limit or dev)
    per_epoch = math.ceil(train / args.batch_size)
    steps = per_epoch * args.epochs
    epochs = args.epochs
    if args.max_steps is not None and args.max_steps < steps:
        steps, epochs = args.max_steps, math.ceil(args.max_steps / per_epoch)
    generated = 0
    if args.task == "sonnet":  # every evaluation generates the dev prompts; the test ones once, unless tuning
        generated = epochs * args.max_new_tokens + (0 if "--no-predict_test" in argv else args.max_new_tokens)
    return steps, epochs * math.ceil(dev / args.eval_batch_size), generated


def estimate(runs: list[planning.PlannedRun], data: Path) -> tuple[float, dict[str, int]]:
    """(GPU-hours, steps by kind) of a list of runs."""
    seconds, steps_by_kind = 0.0, defaultdict(int)
    for run in runs:
        steps, dev_batches, generated = run_steps(run.argv, data)
        name = kind(run.argv)
        step_ms = STEP_MS.get(name, STEP_MS["LoRA"])
        seconds += (steps + dev_batches / 3) * step_ms / 1000 + generated * GENERATION_MS / 1000
        steps_by_kind[name] += steps
    return seconds / 3600, dict(steps_by_kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path)
    parser.add_argument("--model", default=None, help="checkpoint folder that plans the runs (default: the preset's)")
    parser.add_argument("--shape", default="gpt2", help="size preset of the stand-in checkpoint (default: gpt2)")
    parser.add_argument("--data_dir", type=Path, default=None, help="task data (default: $GPT2_DATA_DIR)")
    args = parser.parse_args(argv)
    import os

    data = args.data_dir or Path(os.environ.get("GPT2_DATA_DIR", "data/cs224n"))
    preset = planning.load_preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="grid-cost-") as scratch:
        model = args.model
        if model is None and "random_init" not in preset.model:
            model = str(planning.tiny_checkpoint(Path(scratch), args.shape))
            print(f"planning with a random {args.shape}-shaped checkpoint (same runs as the preset's model)")
        if model is not None:
            preset = dataclasses.replace(preset, model={"model": model})
        grid = planning.plan_grid(preset, Path(scratch) / "grid", [])
        finals = grid.runs
        if grid.waiting:  # their rate is not chosen yet: the prior's middle candidate stands in (same cost)
            finals = finals + stand_in_finals(preset, grid)
    xlora = planning.xlora_count(preset)  # its tuning runs included
    tune_hours, tune_steps = estimate(grid.tuning, data)
    final_hours, final_steps = estimate(finals, data)
    print(f"{args.preset}: {len(grid.tuning)} tuning runs + {len(finals)} final runs + {xlora} X-LoRA runs")
    print(f"  = {len(grid.tuning) + len(finals) + xlora} runs (X-LoRA's not in the hours below)")
    print(f"  estimated GPU-hours (one H200, see the docstring): tuning {tune_hours:.1f} + final {final_hours:.1f}")
    print(f"  = {tune_hours + final_hours:.1f} h; tuning is {tune_hours / (tune_hours + final_hours):.0%} of it")
    unmeasured = sorted({r.variant for r in grid.tuning + finals if kind(r.argv) not in STEP_MS})
    if unmeasured:
        print(f"  without a measured step (LoRA's time is used): {', '.join(unmeasured)}")
    for name in sorted(set(tune_steps) | set(final_steps)):
        ms = STEP_MS.get(name, STEP_MS["LoRA"])
        print(f"  {name:28s} {ms:6.1f} ms/step  tuning {tune_steps.get(name, 0):>9,} steps  final "
              f"{final_steps.get(name, 0):>10,} steps")  # fmt: skip
    return 0


def without(argv: list[str], flags: set[str]) -> list[str]:
    """`argv` less the given flags and their values."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            kept.append(word)
    return kept


def stand_in_finals(preset: planning.GridPreset, grid: planning.GridPlan) -> list[planning.PlannedRun]:
    """The final runs of cells still waiting for their tuning, with the preset's budget (what they cost)."""
    done = {(r.variant, r.task) for r in grid.runs}
    stand_ins = []
    for cell in grid.cells:
        if (cell["variant"], cell["task"]) in done:
            continue
        tune_run = next(r for r in grid.tuning if r.variant == cell["variant"] and r.task == cell["task"])
        argv = without(tune_run.argv, {"--epochs", "--max_steps"})  # the tuning budget, not the final one
        argv = [w for w in argv if w != "--no-predict_test"]
        argv += planning.run_argv(preset, cell["task"], "", cell["variant"], [], 0, Path("."), [])
        stand_ins += [planning.PlannedRun(cell["task"], cell["variant"], seed, argv, "train", Path(".")) for seed in
                      preset.seeds]  # fmt: skip
    return stand_ins


if __name__ == "__main__":
    sys.exit(exit_status(main))
