"""Evaluation throughput per task and the cost of the paraphrase head, in one run.

1. Examples/s on the full dev sets with a tiny randomly initialised GPT-2 (2 layers, width 32,
   real vocabulary) and the padding fraction of the batches before and after length bucketing.
2. The two-token cloze head vs full-vocabulary logits, at gpt2-small width (768, 12 heads, real
   vocabulary, `--layers` blocks), B=32 Quora dev prompts: end to end (model + head) and head only.
Usage: python scripts/bench_eval.py --data_dir ../shared/data/cs224n --tokenizer ../shared/tokenizer/gpt2
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from model import GPT2Config, GPT2LMHeadModel, load_tokenizer
from model.heads import NO_ID, YES_ID, ClozeParaphraseHead
from scripts.bench_utils import median_time
from task_data.batching import collate, encode
from task_data.common import data_dir
from task_data.paraphrase import cloze_prompt, load_paraphrase
from task_data.sonnets import load_sonnets
from train.cli.exits import exit_status
from train.tasks import TASKS
from train.tasks.classification import ClassificationTask
from train.tasks.sonnet import GenerationSettings, generate_sonnets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    tiny = GPT2LMHeadModel(GPT2Config.from_preset("tiny", n_positions=1024)).eval()
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()}; tiny random GPT-2 (2 x 32), "
        f"batch {args.batch_size}"
    )
    print("| task (dev) | examples | examples/s | padding, unbucketed | padding, bucketed | truncated |")
    print("|---|---:|---:|---:|---:|---:|")
    flags = argparse.Namespace(
        max_length=None,
        dev_limit=None,
        test_limit=None,
        train_limit=None,
        paraphrase_head="cloze",
        eval_batch_size=args.batch_size,
        seed=0,
    )
    for name, cls in TASKS.items():
        if not issubclass(cls, ClassificationTask):
            continue
        task = cls(tokenizer, data_dir(args.data_dir), flags, tiny.config.n_positions)
        examples = task.dev
        head = task.make_head(tiny)
        task.predict(tiny, head, examples[:64], args.batch_size)  # warm-up
        run = task.predict(tiny, head, examples, args.batch_size)
        print(
            f"| {name} | {len(examples)} | {len(examples) / run.seconds:.0f} | {run.padding_unbucketed:.1%} | "
            f"{run.padding_bucketed:.1%} | {run.truncated} |",
            flush=True,
        )
    prompts = load_sonnets("dev_prompts", args.data_dir)
    start = time.perf_counter()
    generate_sonnets(tiny, tokenizer, prompts, GenerationSettings(max_new_tokens=160))
    rate = len(prompts) / (time.perf_counter() - start)
    print(f"| sonnet (generation, 160 new tokens, top-p 0.9) | {len(prompts)} | {rate:.2f} | - | - | - |")

    small = GPT2LMHeadModel(GPT2Config.from_preset("gpt2", n_layer=args.layers)).eval()
    pairs = load_paraphrase("dev", args.data_dir)[: args.batch_size]
    ids, mask = collate(encode(tokenizer, [cloze_prompt(p.text) for p in pairs], 128, "left").ids, side="left")
    head = ClozeParaphraseHead(small.lm_head)
    with torch.no_grad():
        hidden = small(ids, attention_mask=mask, return_logits=False).last_hidden_state
        two = head(hidden, mask)
        full = small(ids, attention_mask=mask).logits[:, -1, [NO_ID, YES_ID]]
        assert (two - full).abs().max().item() <= 1e-4
        t_two = median_time(lambda: head(small(ids, attention_mask=mask, return_logits=False).last_hidden_state, mask))
        t_full = median_time(lambda: small(ids, attention_mask=mask).logits[:, -1, [NO_ID, YES_ID]])
        t_head_two = median_time(lambda: head(hidden, mask), repeats=20)
        t_head_full = median_time(lambda: small.lm_head(hidden)[:, -1, [NO_ID, YES_ID]], repeats=20)
    print(f"\nparaphrase head at gpt2-small width ({args.layers} layers), B={ids.shape[0]}, T={ids.shape[1]}:")
    print(
        f"  end to end: two-token {t_two * 1e3:.0f} ms vs full-vocabulary logits {t_full * 1e3:.0f} ms -> "
        f"{t_full / t_two:.2f}x faster"
    )
    print(
        f"  head only:  two-token {t_head_two * 1e3:.2f} ms vs full-vocabulary {t_head_full * 1e3:.1f} ms -> "
        f"{t_head_full / t_head_two:.0f}x faster"
    )


if __name__ == "__main__":
    sys.exit(exit_status(main))
