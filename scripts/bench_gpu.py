"""GPU cost table in one command: training steps of every variant, ours against HF / HF + peft, the
fraction of the measured matmul peak, peak memory, and the real SST loop, eager and on the fast step.

    python scripts/bench_gpu.py                      # on a CUDA GPU (about 3 minutes on an H100/H200)
    python scripts/bench_gpu.py --smoke              # tiny shapes on the CPU (the test suite runs this)
    python scripts/bench_gpu.py --baseline_tree DIR  # also time DIR's code (e.g. an older commit) on the
                                                     # real SST epoch, in this run

Setup (the issue's): gpt2 shape (12 layers, width 768, 12 heads, full vocabulary), random weights,
bf16 autocast with TF32 (what `--precision auto` does on CUDA), B=32, T=128, fused AdamW, default
dropouts, LM loss on every position. Within a table the models' steps are interleaved (one step of
each in turn) and each figure is the median of `--steps` steps after warm-up. "eager" is the plain
step; "graphs" is the fast step of the training loop (static shapes, no host sync, the whole step as
one CUDA graph: train/trainer/graphs.py). Peak memory: what each model's warm-up steps add on top of its
weights (AdamW state, gradients, activations, and for graphs the captured pool).

FLOPs per step: 6 x (matmul parameters, the tied LM head included) x tokens + 6 x layers x width x
T x tokens (causal attention), i.e. trained-weight gradients included; for LoRA methods that
overcounts (frozen weights need no weight gradient), so their fraction of peak is an upper bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from model import GPT2Config, GPT2LMHeadModel
from model.trainable import set_trainable
from scripts.bench_base import matmul_gflops, sync
from train.cli.exits import exit_status

REPO = Path(__file__).resolve().parents[1]

try:  # the fast step (absent from trees older than it: their graphs column stays empty)
    from train.trainer.graphs import CapturedSteps, count_host_syncs
except ImportError:  # pragma: no cover - only when pointed at an old tree
    CapturedSteps = count_host_syncs = None

KERNEL = "--kan_kernel"  # a runtime choice in a variant row, not a config knob

VARIANTS = {
    "full fine-tuning": {},
    "LoRA r=8": {"use_lora": True},
    "DoRA r=8": {"use_lora": True, "lora_dora": True},
    "KoRA": {"use_kora": True},
    "KAN-FFN, mlp init": {"use_kan": True},
    "KAN-FFN, random init (param-matched)": {"use_kan": True, "kan_init": "random"},
    "LoRA-KAN r=8": {"use_lora": True, "use_kan": True},
    # the same three with the spline GEMM as Triton kernels (--kan_kernel triton, modules/kan_triton.py)
    "KAN-FFN, mlp init, triton kernel": {"use_kan": True, KERNEL: "triton"},
    "KAN-FFN, random init (param-matched), triton kernel": {"use_kan": True, "kan_init": "random", KERNEL: "triton"},
    "LoRA-KAN r=8, triton kernel": {"use_lora": True, "use_kan": True, KERNEL: "triton"},
    "graph (dense) + LoRA": {"use_graph": True, "graph_backend": "dense", "use_lora": True},
    "graph (GATConv) + LoRA": {"use_graph": True, "use_lora": True},
}


def autocast(device: str, precision: str, cache: bool = True):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, cache_enabled=cache)


def matmul_peak(device: str, precision: str, size: int) -> float:
    """Measured matmul rate (FLOP/s) in the step's compute dtype: the ceiling the fractions use."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return matmul_gflops(device, dtype, size, repeats=10 if device.startswith("cuda") else 2) * 1e9


def step_flops(config: GPT2Config, model: torch.nn.Module, batch: int, seq: int) -> float:
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n)
    tokens = batch * seq
    return 6 * matmul * tokens + 6 * config.n_layer * config.n_embd * seq * tokens


class Stepper:
    """One model's training step: `eager` or `graphs` (our fast step), or an HF model's eager step."""

    def __init__(self, name, model, loss_fn, device, precision, mode, max_grad_norm=1.0):
        self.name, self.model, self.loss_fn, self.device, self.mode = name, model, loss_fn, device, mode
        self.precision = precision
        self.params = [p for p in model.parameters() if p.requires_grad]
        fused = {"fused": True} if device.startswith("cuda") else {}
        if mode == "graphs":
            fused["capturable"] = True
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, **fused)
        self.max_grad_norm = max_grad_norm
        self.captured = None
        self.times: list[float] = []

    def _eager(self, inputs):
        with autocast(self.device, self.precision):
            loss = self.loss_fn(inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.mode != "graphs")
        return loss

    def step(self, inputs) -> None:
        if self.mode == "graphs" and self.captured is None:
            # the loop's first step is eager too: it creates AdamW's state
            self._eager({k: v.to(self.device) for k, v in inputs.items()})
            self.captured = CapturedSteps(
                lambda task, x: self._cached_off(x), self.params, self.optimizer, self.max_grad_norm, self.device
            )
            return
        if self.mode == "graphs":
            self.captured.step("bench", inputs)
        else:
            self._eager({k: v.to(self.device) for k, v in inputs.items()})

    def _cached_off(self, inputs):
        with autocast(self.device, self.precision, cache=False):
            return self.loss_fn(inputs)

    def timed(self, inputs) -> None:
        sync(self.device)
        start = time.perf_counter()
        self.step(inputs)
        sync(self.device)
        self.times.append(time.perf_counter() - start)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def ours(knobs: dict, base: dict, device: str, precision: str, mode: str) -> Stepper:
    torch.manual_seed(0)
    knobs = dict(knobs)
    kernel = knobs.pop(KERNEL, None)
    config = GPT2Config.from_dict({**base, **knobs})
    model = GPT2LMHeadModel(config).to(device)
    set_trainable(model, config.fine_tune_mode)
    if kernel is not None:
        from modules.kan import use_spline_kernel  # absent from older trees: the row then reports the error

        use_spline_kernel(model, kernel, device)
    try:  # trees with the sync-free training path
        model(torch.zeros(1, 2, dtype=torch.long, device=device), validate=False, right_padded=True)
        fast_kwargs = {"validate": False, "right_padded": True}
    except TypeError:
        fast_kwargs = {}

    def loss(inputs):
        return model(inputs["input_ids"], labels=inputs["input_ids"], **fast_kwargs).loss

    stepper = Stepper(f"ours {mode}", model, loss, device, precision, mode)
    stepper.config = config
    return stepper


def hf(base: dict, device: str, precision: str, lora_r: int | None) -> Stepper:
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**base)  # base: vocab_size, n_positions, n_embd, n_layer, n_head
    hf_config._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(hf_config).to(device)
    name = "HF"
    if lora_r is not None:
        import peft

        lora = peft.LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        )
        model = peft.get_peft_model(model, lora)
        name = "HF + peft"

    def loss(inputs):
        return model(input_ids=inputs["input_ids"], labels=inputs["input_ids"]).loss

    return Stepper(name, model, loss, device, precision, "eager")


def run_table(steppers: list[Stepper], inputs, steps: int, warmup: int) -> dict[str, float | None]:
    """Warm each model up on its own (its peak memory: what its first steps add on top of its weights:
    AdamW state, gradients, activations and, for graphs, the captured memory pool), then time them
    interleaved."""
    memory = {}
    for s in steppers:
        cuda = s.device.startswith("cuda")
        if cuda:
            sync(s.device)
            torch.cuda.reset_peak_memory_stats(s.device)
            before = torch.cuda.memory_allocated(s.device)
        for _ in range(warmup):
            s.step(inputs)
        if cuda:
            sync(s.device)
            memory[s.name] = (torch.cuda.max_memory_allocated(s.device) - before) / 2**20
        else:
            memory[s.name] = None
    for _ in range(steps):
        for s in steppers:  # interleaved: drift hits every model alike
            s.timed(inputs)
    return memory


def fmt_mem(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} MiB"


def random_inputs(batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids}


def reference_tables(args, base, peak) -> None:
    inputs = random_inputs(args.batch, args.seq, base["vocab_size"])
    modes = ["eager"] + (["graphs"] if args.graphs else [])
    print(f"\n## Ours vs reference (B={args.batch}, T={args.seq})\n")
    print(
        "| step | ours eager | ours graphs | reference | eager / ref | graphs / ref | tokens/s (best) | "
        "fraction of peak (best) | peak memory ours / ref |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, knobs, lora_r in (
        ("full fine-tuning vs HF", {}, None),
        ("LoRA r=8 vs HF + peft", {"use_lora": True}, 8),
    ):
        try:
            mine = [ours(knobs, base, args.device, args.precision, m) for m in modes]
            reference = hf(base, args.device, args.precision, lora_r)
            memory = run_table([*mine, reference], inputs, args.steps, args.warmup)
        except Exception as error:  # noqa: BLE001 - one row failing must not lose the others
            print(f"| {label} | error: {type(error).__name__}: {str(error)[:150]} |", flush=True)
            cleanup(args.device)
            continue
        times = [s.median for s in mine]
        best = min(times)
        flops = step_flops(mine[0].config, mine[0].model, args.batch, args.seq)
        graphs = f"{times[1] * 1e3:.1f} ms" if len(times) > 1 else "—"
        graphs_ratio = f"{times[1] / reference.median:.2f}" if len(times) > 1 else "—"
        print(
            f"| {label} | {times[0] * 1e3:.1f} ms | {graphs} | {reference.median * 1e3:.1f} ms | "
            f"{times[0] / reference.median:.2f} | {graphs_ratio} | {args.batch * args.seq / best:,.0f} | "
            f"{flops / best / peak:.3f} | {fmt_mem(memory[mine[-1].name])} / {fmt_mem(memory[reference.name])} |",
            flush=True,
        )
        del mine, reference
        cleanup(args.device)


def variant_table(args, base, peak) -> None:
    inputs = random_inputs(args.batch, args.seq, base["vocab_size"])
    modes = ["eager"] + (["graphs"] if args.graphs else [])
    print(
        f"\n## Every variant (B={args.batch}, T={args.seq}); ratios against LoRA r=8 and full fine-tuning "
        "measured in the same table\n"
    )
    print("| variant | mode | step | × LoRA | × full FT | fraction of peak | peak memory | host syncs/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    references = {
        m: [
            ours(VARIANTS["LoRA r=8"], base, args.device, args.precision, m),
            ours({}, base, args.device, args.precision, m),
        ]
        for m in modes
    }
    for name, knobs in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        if name in ("LoRA r=8", "full fine-tuning"):
            continue
        if knobs.get(KERNEL) == "triton" and not args.device.startswith("cuda"):
            continue  # Triton kernels need a GPU (tests/test_kan_triton.py checks them on the CPU interpreter)
        for mode in modes:
            lora, full = references[mode]
            lora.times, full.times = [], []
            try:
                mine = ours(knobs, base, args.device, args.precision, mode)
                syncs = sync_count(mine, inputs, args.device)
                if mode == "graphs" and syncs:
                    print(f"| {name} | graphs | — (host syncs: the loop runs it eagerly) | | | | | {syncs} |")
                    continue
                memory = run_table([lora, full, mine], inputs, args.steps, args.warmup)
            except Exception as error:  # noqa: BLE001 - one variant failing must not lose the table
                print(f"| {name} | {mode} | error: {type(error).__name__}: {str(error)[:120]} |", flush=True)
                cleanup(args.device)
                continue
            flops = step_flops(mine.config, mine.model, args.batch, args.seq)
            print(
                f"| {name} | {mode} | {mine.median * 1e3:.1f} ms | {mine.median / lora.median:.2f} | "
                f"{mine.median / full.median:.2f} | {flops / mine.median / peak:.3f} | "
                f"{fmt_mem(memory[mine.name])} | {syncs} |",
                flush=True,
            )
            del mine
            cleanup(args.device)
    for mode in modes:
        lora, full = references[mode]
        if not (lora.times and full.times):
            continue
        print(
            f"\nreferences, {mode}: LoRA {lora.median * 1e3:.1f} ms, full fine-tuning {full.median * 1e3:.1f} ms "
            f"(medians over this table)"
        )


def sync_count(stepper: Stepper, inputs, device: str) -> int | str:
    if count_host_syncs is None:
        return "—"
    x = {k: v.to(device) for k, v in inputs.items()}

    def fwd_bwd():
        with autocast(device, stepper.precision):
            loss = stepper.loss_fn(x)
        loss.backward()

    counts = count_host_syncs(fwd_bwd)
    stepper.optimizer.zero_grad(set_to_none=stepper.mode != "graphs")
    return sum(counts.values())


def long_context(args, base, peak) -> None:
    print("\n## Full fine-tuning at longer contexts\n")
    print("| shape | mode | step | tokens/s | fraction of peak | peak memory |")
    print("|---|---|---:|---:|---:|---:|")
    modes = ["eager"] + (["graphs"] if args.graphs else [])
    for batch, seq in args.long:
        if seq > base["n_positions"]:
            continue
        inputs = random_inputs(batch, seq, base["vocab_size"])
        for mode in modes:
            try:
                mine = ours({}, base, args.device, args.precision, mode)
                memory = run_table([mine], inputs, args.steps, args.warmup)
            except Exception as error:  # noqa: BLE001
                print(f"| B={batch}, T={seq} | {mode} | error: {type(error).__name__}: {str(error)[:150]} |")
                cleanup(args.device)
                continue
            flops = step_flops(mine.config, mine.model, batch, seq)
            print(
                f"| B={batch}, T={seq} | {mode} | {mine.median * 1e3:.1f} ms | {batch * seq / mine.median:,.0f} | "
                f"{flops / mine.median / peak:.3f} | {fmt_mem(memory[mine.name])} |",
                flush=True,
            )
            del mine
            cleanup(args.device)


def cleanup(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def real_loop(args, base) -> None:
    """`python -m train.sentiment --dataset sst --use_lora` for one epoch on a random gpt2-shaped
    checkpoint, as a user runs it: eager, the fast step, and (with --baseline_tree) that tree's code."""
    import transformers

    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    checkpoint = work / "ckpt"
    torch.manual_seed(0)
    shape = {**base, "vocab_size": 50257}  # the tokenizer's vocabulary
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).save_pretrained(checkpoint)
    flags = [
        "--dataset",
        "sst",
        "--use_lora",
        "--batch_size",
        str(args.batch),
        "--epochs",
        "1",
        "--device",
        args.device,
        "--model",
        str(checkpoint),
        "--wandb",
        "disabled",
    ]
    if args.smoke:
        flags += ["--train_limit", "64", "--dev_limit", "32", "--test_limit", "16"]
    no_dropout = ["--embd_pdrop", "0", "--attn_pdrop", "0", "--resid_pdrop", "0", "--lora_dropout", "0"]
    runs = [
        ("today's tree, --fast_step off (eager, the default)", REPO, ["--fast_step", "off"]),
        ("today's tree, --fast_step on (dropout on: static shapes, eager)", REPO, ["--fast_step", "on"]),
        ("today's tree, --fast_step off, dropouts 0", REPO, ["--fast_step", "off", *no_dropout]),
        ("today's tree, --fast_step on, dropouts 0 (CUDA graphs)", REPO, ["--fast_step", "on", *no_dropout]),
    ]
    if args.dropout_capture:  # reproduces the crash that keeps dropout off the captured step (docs/gpu.md)
        runs.append(
            (
                "today's tree, --fast_step on, dropout on, captured anyway (GPT2_CAPTURE_DROPOUT=1)",
                REPO,
                ["--fast_step", "on"],
            )
        )
    if args.compile_loop:
        runs.append(
            (
                "today's tree, --fast_step on --compile, dropouts 0",
                REPO,
                ["--fast_step", "on", "--compile", *no_dropout],
            )
        )
    if args.smoke:  # the pipeline check: the fast step's run (its eager twin is the same loop)
        runs = runs[1:2]
    if args.baseline_tree:
        runs.insert(0, (f"baseline tree {args.baseline_tree} (its default)", Path(args.baseline_tree), []))
    print("\n## Real loop: one SST epoch with LoRA (python -m train.sentiment), random gpt2-shaped checkpoint\n")
    print("| code | train seconds | steps | ms/step | process wall s | × first row (train s) |")
    print("|---|---:|---:|---:|---:|---:|")
    first = None
    for label, tree, extra in runs:
        out = work / f"out{len(extra)}{abs(hash(label)) % 1000}"
        env = dict(os.environ)  # this tree is the installed one; another is put first on the path
        if "GPT2_CAPTURE_DROPOUT" in label:
            env.update(GPT2_CAPTURE_DROPOUT="1", CUDA_LAUNCH_BLOCKING="1")
        if tree != REPO:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "train.sentiment", *flags, *extra, "--out_dir", str(out)],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.loop_timeout,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"| {label} | failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]} |")
            continue
        metrics = json.loads(next(out.glob("*/metrics.json")).read_text())
        seconds, steps = metrics["train_seconds"], metrics["steps"]
        first = first or seconds
        print(
            f"| {label} | {seconds:.2f} | {steps} | {seconds / steps * 1e3:.1f} | {wall:.1f} | {seconds / first:.2f} |",
            flush=True,
        )
        note = [line for line in proc.stderr.splitlines() if line.startswith("fast step")]
        if note:
            print(f"|   ({note[0][:150]}) | | | | | |")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds; for the test suite)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--only", default=None, help="variant rows whose name contains TEXT")
    parser.add_argument("--sections", default="reference,variants,long,loop")
    parser.add_argument("--baseline_tree", default=None, help="another checkout whose real-loop epoch is timed too")
    parser.add_argument("--compile_loop", action="store_true", help="also time the real loop with --compile")
    parser.add_argument(
        "--dropout_capture",
        action="store_true",
        help="also run the real loop captured with dropout on (the known crash; CUDA_LAUNCH_BLOCKING=1)",
    )
    parser.add_argument("--loop_timeout", type=int, default=300)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device; use --smoke for the CPU check")
    cuda = args.device.startswith("cuda")
    args.precision = "bf16" if cuda else "fp32"
    args.graphs = cuda and CapturedSteps is not None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    args.long = [(8, 512), (16, 1024)]
    if args.smoke:
        # random token ids: a small vocabulary keeps the LM head from dominating the tiny step (the
        # real loop below tokenizes SST, so its checkpoint has GPT-2's vocabulary)
        base = dict(vocab_size=1024, n_positions=128, n_embd=32, n_layer=2, n_head=2)
        args.batch, args.seq, args.steps, args.warmup = 4, 16, 2, 1
        args.long = [(2, 64)]
    peak = matmul_peak(args.device, args.precision, 8192 if cuda else 512)
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    print(
        f"# bench_gpu on {name}: torch {torch.__version__}, {args.precision}, matmul peak measured "
        f"{peak / 1e12:.1f} TFLOP/s; shape {base}; median of {args.steps} steps"
        + (" (SMOKE: tiny shapes, pipeline check only)" if args.smoke else ""),
        flush=True,
    )
    sections = args.sections.split(",")
    started = time.perf_counter()
    if "reference" in sections:
        reference_tables(args, base, peak)
    if "variants" in sections:
        variant_table(args, base, peak)
    if "long" in sections:
        long_context(args, base, peak)
    if "loop" in sections:
        real_loop(args, base)
    print(f"\nbench_gpu: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(exit_status(main))
