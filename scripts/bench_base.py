"""Benchmark the base model against Hugging Face transformers, in one run, as ratios.

1. Training step (forward + backward + AdamW) at gpt2-small width, B=8, T=128: ours / HF time.
2. Greedy generation of 64 new tokens: ours / HF tokens per second.
3. Achieved GFLOP/s of our training step as a fraction of this machine's matmul rate in the step's precision.

Both models hold the same weights (ours is loaded from the HF checkpoint) and run with the same
thread count; timings alternate ours/HF so drift hits both. Usage:
    python scripts/bench_base.py [--layers 4] [--steps 5] [--threads 2] [--device cpu]
        [--precision fp32|bf16] [--compile]
On a GPU, the issue's table: --device cuda --layers 12 --batch 8 --seq 512 --precision bf16 [--compile]
(--compile compiles each block of BOTH models, as our --compile does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from model import GPT2LMHeadModel
from model.compile import compile_blocks
from train.cli.exits import exit_status
from train.trainer.distributed import device_synchronize


def sync(device: str) -> None:
    device_synchronize(device)  # cuda:N included (the index matters)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def matmul_gflops(device: str, dtype: torch.dtype = torch.float32, size: int = 4096, repeats: int = 10) -> float:
    """This machine's matmul rate in `dtype` (the step's compute dtype: bf16 under --precision bf16)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def train_step_time(model, loss_fn, ids, device: str, precision: str = "fp32") -> float:
    optimizer = model._bench_opt
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_fn(ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def generation_rate(generate, ids, new_tokens: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    out = generate(ids)
    sync(device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="train steps under autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block of both models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # fp32 matmuls on CUDA use TF32, as our training does (for both models, and the peak rate)
    torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    transformers.logging.set_verbosity_error()
    device = args.device
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        n_layer=args.layers,
        n_head=12,
        n_embd=768,
        vocab_size=50257,
        n_positions=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.GPT2LMHeadModel(hf_config)
    checkpoint = tempfile.TemporaryDirectory()
    hf.save_pretrained(checkpoint.name)
    ours = GPT2LMHeadModel.from_pretrained(checkpoint.name)
    hf.to(device).train()
    ours.to(device).train()
    if args.compile:
        compile_blocks(ours)
        for block in hf.transformer.h:
            block.compile()
    for model in (ours, hf):
        model._bench_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 50257, (args.batch, args.seq), device=device)
    # Each library's own training path (labels=...), and both through the same external loss.
    paths = {
        "own loss (labels=)": (lambda x: ours(x, labels=x).loss, lambda x: hf(x, labels=x).loss),
        "logits + F.cross_entropy": (lambda x: lm_loss(ours(x).logits, x), lambda x: lm_loss(hf(x).logits, x)),
    }

    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"transformers={transformers.__version__}"
    )
    print(
        f"shape: gpt2-small width (768, 12 heads), {args.layers} layers, B={args.batch}, T={args.seq}, "
        f"{args.precision}{', compiled blocks' if args.compile else ''}"
    )
    step_times = {}
    for label, (ours_loss, hf_loss) in paths.items():
        for _ in range(2 if args.compile else 1):  # warm-up (compilation), then alternate
            train_step_time(ours, ours_loss, ids, device, args.precision)
            train_step_time(hf, hf_loss, ids, device, args.precision)
        ours_times, hf_times = [], []
        for _ in range(args.steps):
            ours_times.append(train_step_time(ours, ours_loss, ids, device, args.precision))
            hf_times.append(train_step_time(hf, hf_loss, ids, device, args.precision))
        ours_step, hf_step = statistics.median(ours_times), statistics.median(hf_times)
        step_times[label] = ours_step
        print(
            f"train step [{label:24s}] ours {ours_step * 1e3:8.1f} ms   HF {hf_step * 1e3:8.1f} ms   "
            f"ratio ours/HF = {ours_step / hf_step:.3f}  (target <= 0.95)"
        )
    ours_step = step_times["own loss (labels=)"]

    # FLOPs: 6 x params (the tied LM head counts once as a matmul, wpe is a lookup) x tokens + attention
    params = ours.num_parameters() - ours.transformer.wpe.weight.numel()
    tokens = args.batch * args.seq
    flops = 6 * params * tokens + 12 * args.layers * args.seq * 768 * tokens // 2  # causal: half the scores
    peak = matmul_gflops(device, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    achieved = flops / ours_step / 1e9
    print(
        f"training     {flops / 1e9:.0f} GFLOP/step -> {achieved:.1f} GFLOP/s; {args.precision} matmul peak here "
        f"{peak:.1f} GFLOP/s; fraction = {achieved / peak:.2f}"
    )

    # Generation: fresh, eager copies of the same checkpoint in exact fp32 (the trained models' weights
    # have drifted apart, and on a random model near-tied logits flip greedy tokens under TF32).
    torch.backends.cuda.matmul.allow_tf32 = False
    hf = transformers.GPT2LMHeadModel.from_pretrained(checkpoint.name).to(device).eval()
    ours = GPT2LMHeadModel.from_pretrained(checkpoint.name).to(device).eval()
    checkpoint.cleanup()
    prompt = torch.randint(0, 50257, (1, 16), device=device)
    n = args.new_tokens
    with torch.no_grad():
        ours_gen = lambda x: ours.generate(x, max_new_tokens=n, eos_token_id=None)
        hf_gen = lambda x: hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=50256,
        )
        assert torch.equal(ours_gen(prompt), hf_gen(prompt)), "greedy outputs differ"
        ours_rates, hf_rates = [], []
        for _ in range(3):
            ours_rates.append(generation_rate(ours_gen, prompt, n, device))
            hf_rates.append(generation_rate(hf_gen, prompt, n, device))
    ours_rate, hf_rate = statistics.median(ours_rates), statistics.median(hf_rates)
    print(
        f"generation   ours {ours_rate:8.1f} tok/s   HF {hf_rate:8.1f} tok/s   "
        f"ratio ours/HF = {ours_rate / hf_rate:.3f}  (target >= 1.0; greedy tokens identical)"
    )


if __name__ == "__main__":
    sys.exit(exit_status(main))
