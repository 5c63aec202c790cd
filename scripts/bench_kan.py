"""KAN layer and LoRA-KAN adapter benchmarks, in one run, as ratios.

1. Our KANLinear vs the efficient-kan algorithm (re-implemented below from its description: per-input
   knot grid, Cox–de Boor recursion materialising every order's bases, a separate spline scaler,
   plain autograd), 768->768 and 768->3072, N=2048 tokens, grid 5, order 3, SiLU base:
   fwd+bwd time ratio (target <= 0.5), saved-activation memory ratio (target <= 0.5), outputs equal.
2. Our LoRA-KAN adapter vs kolmg-lora's KOLMGLoRALinear, r=16, grid 4, order 1, 768->768:
   fwd+bwd time ratio (target <= 0.5), outputs equal on the same weights.
3. With --temporaries: peak-RSS growth of one fwd+bwd of a 3072->768 KAN at N=4096 (B=8, T=512),
   dense bases in one block (as before row blocks) vs in row blocks, each in a fresh process.
Usage: python scripts/bench_kan.py [--threads 2] [--tokens 2048] [--device cpu] [--temporaries]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model import GPT2Config
from modules.kan import KANLinear
from modules.kan_lora import KANLoRALinear
from scripts.bench_utils import median_time, saved_activation_bytes
from train.cli.exits import exit_status


class EfficientKANReference(nn.Module):
    """The efficient-kan algorithm: grid (in, G+2k+1), Cox–de Boor recursion, spline scaler."""

    def __init__(self, in_features, out_features, grid_size=5, order=3, grid_range=(-1.0, 1.0)):
        super().__init__()
        h = (grid_range[1] - grid_range[0]) / grid_size
        grid = torch.arange(-order, grid_size + order + 1) * h + grid_range[0]
        self.register_buffer("grid", grid.expand(in_features, -1).contiguous())
        self.order = order
        self.base_weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.spline_weight = nn.Parameter(torch.randn(out_features, in_features, grid_size + order) * 0.1)
        self.spline_scaler = nn.Parameter(torch.ones(out_features, in_features))

    def b_splines(self, x):
        grid = self.grid
        x = x.unsqueeze(-1)
        bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
        for k in range(1, self.order + 1):
            bases = ((x - grid[:, : -(k + 1)]) / (grid[:, k:-1] - grid[:, : -(k + 1)]) * bases[:, :, :-1]) + (
                (grid[:, k + 1 :] - x) / (grid[:, k + 1 :] - grid[:, 1:(-k)]) * bases[:, :, 1:]
            )
        return bases

    def forward(self, x):
        base = F.linear(F.silu(x), self.base_weight)
        scaled = self.spline_weight * self.spline_scaler.unsqueeze(-1)
        spline = F.linear(self.b_splines(x).view(x.size(0), -1), scaled.view(scaled.size(0), -1))
        return base + spline


def fwd_bwd(module, x):
    """One forward + backward with the input requiring grad, as inside a network."""
    x = x.detach().requires_grad_(True)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    return step


def kan_layer_rows(tokens: int, repeats: int, device: str) -> list[str]:
    rows = []
    for n_in, n_out in ((768, 768), (768, 3072)):
        torch.manual_seed(0)
        ref = EfficientKANReference(n_in, n_out)
        ours = KANLinear(n_in, n_out, grid_size=5, spline_order=3, grid_range=(-1.0, 1.0), base="silu")
        with torch.no_grad():
            ours.base_weight.copy_(ref.base_weight)
            ours.spline_coeff.copy_(ref.spline_weight * ref.spline_scaler.unsqueeze(-1))
        x = torch.rand(tokens, n_in) * 1.8 - 0.9  # inside the grid, where both are defined the same
        with torch.no_grad():
            gap = (ours(x) - ref(x)).abs().max().item()
        t_ours = median_time(fwd_bwd(ours, x), repeats, device=device)
        t_ref = median_time(fwd_bwd(ref, x), repeats, device=device)
        x_grad = x.detach().requires_grad_(True)
        m_ours = saved_activation_bytes(lambda m=ours, x=x_grad: m(x).sum())
        m_ref = saved_activation_bytes(lambda m=ref, x=x_grad: m(x).sum())
        rows.append(
            f"| KAN {n_in}->{n_out}, N={tokens}, G=5, k=3 | {t_ours * 1e3:.0f} ms | {t_ref * 1e3:.0f} ms | "
            f"**{t_ours / t_ref:.2f}** | {m_ours / 2**20:.1f} MiB | {m_ref / 2**20:.1f} MiB | "
            f"**{m_ours / m_ref:.2f}** | {gap:.1e} |"
        )
    return rows


def kan_lora_row(tokens: int, repeats: int, device: str) -> str:
    from kolmg_lora import KOLMGLoRALinear

    torch.manual_seed(0)
    base = nn.Linear(768, 768)
    ref = KOLMGLoRALinear(base, rank=16, alpha=32.0, grid_size=4, spline_order=1, grid_range=(-1.0, 1.0))
    with torch.no_grad():
        ref.kan.out_base_weight.normal_(0, 0.01)
        ref.kan.out_spline_weight.normal_(0, 0.01)
    config = GPT2Config(
        lora_r=16,
        lora_alpha=32.0,
        kan_grid_size=4,
        kan_spline_order=1,
        kan_grid_range=(-1.0, 1.0),
        lora_kan_squash=False,
        lora_dropout=0.0,
    )
    ours = KANLoRALinear(base, config)
    with torch.no_grad():
        ours.kan_in.base_weight.copy_(ref.kan.in_base_weight)
        ours.kan_in.spline_coeff.copy_(ref.kan.in_spline_weight * ref.kan.in_spline_scaler[..., None])
        ours.kan_out.base_weight.copy_(ref.kan.out_base_weight)
        ours.kan_out.spline_coeff.copy_(ref.kan.out_spline_weight * ref.kan.out_spline_scaler[..., None])
    x = torch.rand(tokens, 768) * 0.2 - 0.1  # keeps φ_in's outputs inside the grid as well
    with torch.no_grad():
        gap = (ours(x) - ref(x)).abs().max().item()
    t_ours = median_time(fwd_bwd(ours, x), repeats, device=device)
    t_ref = median_time(fwd_bwd(ref, x), repeats, device=device)
    return (
        f"| LoRA-KAN 768->768, r=16, G=4, k=1, N={tokens} | {t_ours * 1e3:.0f} ms | {t_ref * 1e3:.0f} ms | "
        f"**{t_ours / t_ref:.2f}** | | | | {gap:.1e} |"
    )


TEMPORARIES = """
import resource, sys, time, torch
import modules.kan as kan
torch.set_num_threads({threads})
kan.CHUNK_ELEMENTS = {elements}
layer = kan.KANLinear(3072, 768, grid_size=5, spline_order=3)
x = (torch.rand(4096, 3072) * 1.8 - 0.9).requires_grad_(True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
layer(x).sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, time.perf_counter() - start)
"""


def temporaries_rows(threads: int) -> list[str]:
    import subprocess

    from modules import kan

    rows = []
    for label, elements in (("one block (before)", 1 << 40), ("row blocks (now)", kan.CHUNK_ELEMENTS)):
        code = TEMPORARIES.format(threads=threads, elements=elements)
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True
        )
        mib, seconds = map(float, out.stdout.split())
        rows.append(f"| KAN 3072->768, N=4096, {label} | {mib:.0f} MiB peak RSS growth | {seconds:.1f} s |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temporaries", action="store_true", help="only the temporaries measurement")
    args = parser.parse_args()
    if args.temporaries:
        print("| layer | memory | time |\n|---|---|---|")
        print("\n".join(temporaries_rows(args.threads)))
        return
    torch.set_default_device(args.device)  # every module and input below is built there
    torch.set_num_threads(args.threads)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} (fwd+bwd, median of {args.repeats})")
    print("| layer | ours | reference | time ratio | ours saved | ref saved | memory ratio | max |out diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for row in kan_layer_rows(args.tokens, args.repeats, args.device):
        print(row, flush=True)
    print(kan_lora_row(args.tokens, args.repeats, args.device))


if __name__ == "__main__":
    sys.exit(exit_status(main))
