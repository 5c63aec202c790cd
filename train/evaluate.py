"""Evaluate a model on one task or all of them: dev metrics + course-format predictions for dev and test.

    python -m train.evaluate --task sst|cfimdb|quora|sonnet|all --model gpt2 --data_dir DIR --out_dir DIR

`--model` is a hub id, a local Hugging Face GPT-2 checkpoint folder, or a run folder written by
training (its best checkpoint: the base model it was trained from, its variants, its trained weights
and task heads). Writes, per task,
`<task>-dev-output.csv` / `<task>-test-output.csv` (sonnets: `sonnet-dev-output.txt` /
`sonnet-test-output.txt`) and `metrics.json` with `dev_acc` + `dev_f1` (classification) or
`dev_chrf` (sonnets), and `predictions` (split -> file name). With `--task all` each task gets a
sub-folder and the top-level metrics.json maps task -> its metrics.

A bare language model has no trained sentiment head: that head is freshly initialised (seeded)
and the run says so; its numbers are a pipeline check, not a result. The paraphrase cloze head
and sonnet generation need no new parameters. Test files carry no labels and are never scored.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from datasets.common import DataError, data_dir
from datasets.sonnets import load_sonnets
from model import CheckpointError, GPT2LMHeadModel, TokenizerNotFound, load_tokenizer
from model.loading import atomic_write_json
from train.cli import STACK_FIELDS
from train.predictions import write_classification, write_sonnets
from train.tasks import (
    CLASSIFICATION_TASKS,
    GenerationSettings,
    classification_metrics,
    generate_sonnets,
    predict,
    sonnet_chrf,
)

log = logging.getLogger("evaluate")
TASKS = ("sst", "cfimdb", "quora", "sonnet")


def load_model(spec: str) -> tuple[GPT2LMHeadModel, dict[str, dict[str, torch.Tensor]], dict]:
    """(model, trained head weights per task, training flags) for a hub id, an HF folder or a run folder."""
    from train import checkpoint as ckpt

    path = Path(spec)
    best = ckpt.checkpoint_folder(path / "checkpoints", "best") if path.is_dir() else None
    if best is None and (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path} is a training run without a best checkpoint yet (no evaluation finished); "
                              f"resume it with --resume or pass another model")
    if best is None or not (path / "config.json").is_file():
        return GPT2LMHeadModel.from_pretrained(spec), {}, {}
    record = json.loads((path / "config.json").read_text())
    saved = record["config"]
    overrides = {k: v for k, v in saved.items() if k not in STACK_FIELDS}
    model = GPT2LMHeadModel.from_pretrained(record["training"]["model"], **overrides)
    weights, _, _ = ckpt.load_checkpoint(best)
    own = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    ckpt.copy_into(dict(model.named_parameters()), own, best)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if key.startswith("heads."):
            task, _, rest = key.removeprefix("heads.").partition(".")
            heads.setdefault(task, {})[rest] = value
    log.info("loaded run %s (best checkpoint %s): %d model tensors, heads for %s", path, best.name, len(own),
             sorted(heads) or "none")
    return model, heads, record["training"]


def evaluate_classification(name: str, model, tokenizer, args, out_dir: Path, trained_heads=None) -> dict:
    task = CLASSIFICATION_TASKS[name]
    torch.manual_seed(args.seed)
    head = task.make_head(model, args.paraphrase_head).to(args.device)
    if trained_heads and name in trained_heads:
        head.load_state_dict(trained_heads[name])  # strict: a head of another shape raises
    elif not (name == "quora" and args.paraphrase_head == "cloze"):
        log.warning("%s: the %s head is freshly initialised (no trained head in %s): a pipeline check, not a result",
                    name, type(head).__name__, args.model)
    metrics: dict = {"task": name, "predictions": {}}
    for split in ("dev", "test"):
        examples = task.load(split, args.data_dir)
        limit = args.dev_limit if split == "dev" else args.test_limit
        examples = examples[:limit] if limit else examples
        run = predict(task, model, head, tokenizer, examples, args.batch_size, device=args.device,
                      max_length=args.max_length)
        filename = f"{name}-{split}-output.csv"
        write_classification(out_dir / filename, name, [e.id for e in examples], run.predictions)
        metrics["predictions"][split] = filename
        metrics[f"{split}_examples_per_second"] = len(examples) / run.seconds
        metrics[f"{split}_padding_fraction"] = {"unbucketed": run.padding_unbucketed, "bucketed": run.padding_bucketed}
        metrics[f"{split}_truncated"] = run.truncated
        if split == "dev":
            metrics.update(classification_metrics(examples, run.predictions, task.num_labels))
    return metrics


def evaluate_sonnets(model, tokenizer, args, out_dir: Path) -> dict:
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, do_sample=not args.greedy, seed=args.seed)
    metrics: dict = {"task": "sonnet", "predictions": {}}
    for split in ("dev", "test"):
        prompts = load_sonnets(f"{split}_prompts", args.data_dir)
        limit = args.dev_limit if split == "dev" else args.test_limit
        prompts = prompts[:limit] if limit else prompts
        start = time.perf_counter()
        sonnets = generate_sonnets(model, tokenizer, prompts, settings, args.device)
        metrics[f"{split}_examples_per_second"] = len(prompts) / (time.perf_counter() - start)
        filename = f"sonnet-{split}-output.txt"
        write_sonnets(out_dir / filename, sonnets)
        metrics["predictions"][split] = filename
        if split == "dev":
            metrics["dev_chrf"] = sonnet_chrf(sonnets, load_sonnets("dev_gold", args.data_dir))
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=[*TASKS, "all"])
    parser.add_argument("--model", default="gpt2", help="hub id or local HF GPT-2 checkpoint folder")
    parser.add_argument("--data_dir", default=None, help="task data folder (default: $GPT2_DATA_DIR or data/cs224n)")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: $GPT2_TOKENIZER or the hub)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=None,
                        help="token cap per example (default: sst/quora 128, cfimdb 512; at most n_positions)")
    parser.add_argument("--dev_limit", type=int, default=None, help="use the first N dev examples")
    parser.add_argument("--test_limit", type=int, default=None, help="use the first N test examples")
    parser.add_argument("--paraphrase_head", choices=["cloze", "linear"], default="cloze")
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=1.2)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--greedy", action="store_true", help="greedy sonnet decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.data_dir = data_dir(args.data_dir)
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return _evaluate(args)
    except (CheckpointError, DataError, TokenizerNotFound, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace) -> int:
    model, trained_heads, training = load_model(args.model)
    model = model.to(args.device).eval()
    if training.get("paraphrase_head") and training["paraphrase_head"] != args.paraphrase_head:
        log.warning("the run was trained with --paraphrase_head %s; evaluating with that head",
                    training["paraphrase_head"])
        args.paraphrase_head = training["paraphrase_head"]
    tokenizer = load_tokenizer(args.tokenizer)
    out_dir = Path(args.out_dir)
    tasks = TASKS if args.task == "all" else (args.task,)
    summary = {}
    for name in tasks:
        folder = out_dir / name if args.task == "all" else out_dir
        folder.mkdir(parents=True, exist_ok=True)
        if name == "sonnet":
            metrics = evaluate_sonnets(model, tokenizer, args, folder)
        else:
            metrics = evaluate_classification(name, model, tokenizer, args, folder, trained_heads)
        metrics["model"] = str(args.model)
        atomic_write_json(folder / "metrics.json", metrics)
        summary[name] = metrics
        score = {k: round(v, 4) for k, v in metrics.items() if k in ("dev_acc", "dev_f1", "dev_chrf")}
        print(f"{name}: {score} -> {folder}")
    if args.task == "all":
        atomic_write_json(out_dir / "metrics.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
