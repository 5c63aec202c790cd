"""KAN linear layer (Liu et al., 2024, "KAN: Kolmogorov-Arnold Networks") on a uniform B-spline grid.

    y_j = Σ_i [ w_base_ji · b(x_i) + Σ_k c_jik · B_k(x_i) ] (+ bias_j)     x: (N, in) -> y: (N, out)

Grid: G intervals on [lo, hi], spacing h = (hi - lo) / G, knots t_m = lo + (m - k) h for
m = 0..G+2k, so there are G + k bases of order k (1: piecewise linear, 2: quadratic, 3: cubic).

Bases, two exact forms of one function. On a uniform grid every basis is a shifted cardinal B-spline,
B_j(x) = N_k(u - j + k) with u = (x - lo)/h, and for x in interval m only B_m..B_{m+k} are non-zero,
with values that are fixed polynomials of f = u - m (no Cox–de Boor recursion in either form):
* the local form (`_local_bases`, the default): the k+1 values from [1, f, …, f^k] · M_k,
  scattered into zeros;
* the closed form (`dense_bases`, `CLOSED_FORM = True`): N_k evaluated on (…, in, G+k) as one
  elementwise expression, no index tensors, no scatter or gather; on CUDA torch.compile makes it one
  kernel (`_fused_bases`). It was meant to make LoRA-KAN cheap on a GPU, but on an H200 the
  LoRA-KAN step with it took 468 ms eager (354 ms as a CUDA graph), against 437 ms eager for the
  previous commit's local form on another H200 (BENCHMARKS.md): no gain. On this CPU it is 1.3-1.5x
  slower. So it is opt-in until a profile shows where LoRA-KAN's time goes. Tests check both forms
  against scipy and each other.
Memory-lean: the autograd function saves only x and recomputes the bases in backward instead of
keeping them alive, and it builds them one row block at a time (`CHUNK_ELEMENTS`), so its
temporaries do not grow with B·T. The spline matmul is a dense GEMM over all G+k bases (a gather of
only the k+1 non-zero ones, `embedding_bag` with per-sample weights, does fewer FLOPs but measured
7x slower on CPU).

On CUDA the spline GEMM can instead run as Triton kernels that build the bases in registers inside
the matmul (`modules/kan_triton.py`, `--kan_kernel triton`; equal to this path within float rounding).

Precision: the bases and the spline GEMM run in the coefficients' dtype (float32) with autocast off,
so the bases keep their partition of unity; the layer's output is cast back to the run's precision.

Out-of-grid inputs are CLAMPED to [lo, hi] for the spline term (the spline is constant beyond the
grid and its slope there is zero), never silently zeroed as on a grid whose bases all vanish; the
base term b(x) still carries x. `update_grid` extends the grid by whole intervals to cover observed
activations and, optionally, refines it; both keep the function unchanged inside the old grid.

No separate "spline scaler": c already is the scaled coefficient (efficient-kan multiplies by its
scaler twice in its grid update, which changes the function).

Identity-at-init is the caller's choice: `zero_init=True` zeroes base and spline weights.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from modules.mlp import gelu_tanh

SPLINE_KERNELS = ("torch", "triton")
BASE_FUNCTIONS = {"silu": F.silu, "identity": lambda x: x, "gelu": gelu_tanh}
SUPPORTED_ORDERS = (1, 2, 3)


def _cardinal(s: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cardinal B-spline N_k(s) of `order` k (support [0, k+1]) and dN/ds, elementwise, in the
    symmetric form r = |s - (k+1)/2|:
        k=1: 1 - r                                   (r < 1)
        k=2: 3/4 - r²  (r < 1/2),  (3/2 - r)²/2       (1/2 ≤ r < 3/2)
        k=3: 2/3 - r² + r³/2  (r < 1),  (2 - r)³/6    (1 ≤ r < 2)
    and 0 beyond. Pure elementwise maths: no indices, no scatter, so it fuses into one kernel."""
    centre = (order + 1) / 2
    d = s - centre
    r = d.abs()
    sign = torch.sign(d)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if order == 1:
        inner = r < 1
        return torch.where(inner, 1 - r, zero), torch.where(inner, -sign, zero)
    if order == 2:
        outer_r = (1.5 - r).clamp(min=0)
        value = torch.where(r < 0.5, 0.75 - r * r, 0.5 * outer_r * outer_r)
        slope = torch.where(r < 0.5, -2 * r, -outer_r)
        return value, sign * slope
    outer_r = (2 - r).clamp(min=0)
    value = torch.where(r < 1, 2 / 3 - r * r + 0.5 * r * r * r, outer_r * outer_r * outer_r / 6)
    slope = torch.where(r < 1, -2 * r + 1.5 * r * r, -0.5 * outer_r * outer_r)
    return value, sign * slope


def dense_bases(
    x: torch.Tensor, lo: float, h: float, grid_size: int, order: int, derivative: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All G+k B-spline bases of a uniform grid at x (…, in) -> (…, in, G+k), inputs clamped to
    [lo, hi], and, with `derivative`, d bases / dx (zero where x was clamped: the spline is constant
    beyond the grid). On the grid u = (x - lo)/h basis j is the cardinal spline N_k(u - j + k)."""
    u = (x - lo) / h
    inside = (u >= 0) & (u <= grid_size)
    u = u.clamp(0, grid_size)
    shifts = torch.arange(grid_size + order, dtype=x.dtype, device=x.device) - order
    values, slopes = _cardinal(u.unsqueeze(-1) - shifts, order)
    if not derivative:
        return values, None
    return values, slopes * (inside.to(x.dtype) / h).unsqueeze(-1)


# The CPU path: only the k+1 non-zero bases per input, from their polynomial form on one interval.
# Rows: powers f^0..f^k; columns: the k+1 non-zero bases B_m..B_{m+k} on one interval.
_CARDINAL = {
    1: [[1.0, 0.0], [-1.0, 1.0]],
    2: [[0.5, 0.5, 0.0], [-1.0, 1.0, 0.0], [0.5, -1.0, 0.5]],
    3: [
        [1 / 6, 4 / 6, 1 / 6, 0.0],
        [-3 / 6, 0.0, 3 / 6, 0.0],
        [3 / 6, -6 / 6, 3 / 6, 0.0],
        [-1 / 6, 3 / 6, -3 / 6, 1 / 6],
    ],
}


@functools.lru_cache(maxsize=32)
def _cardinal_matrix(order: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built once per (order, dtype, device), not on every forward and backward of every layer.
    return torch.tensor(_CARDINAL[order], dtype=dtype, device=device)


def _local_bases(x: torch.Tensor, lo: float, h: float, grid_size: int, order: int, derivative: bool = False):
    """Index of the first non-zero basis (…, in) and the k+1 values (…, in, k+1) [and d/dx]."""
    u = (x - lo) / h
    inside = (u >= 0) & (u <= grid_size)
    u = u.clamp_(0, grid_size)
    m = u.floor().clamp_(max=grid_size - 1)
    f = (u - m).unsqueeze(-1)
    if order == 1:  # hat functions: the common LoRA-KAN case, without the power matrix
        values = torch.cat([1 - f, f], dim=-1)
        slopes = None
        if derivative:
            slope = (inside.to(x.dtype) / h).unsqueeze(-1)
            slopes = torch.cat([-slope, slope], dim=-1)
        return m.long(), values, slopes
    coeffs = _cardinal_matrix(order, x.dtype, x.device)  # (k+1, k+1)
    powers = torch.cat([torch.ones_like(f)] + [f**p for p in range(1, order + 1)], dim=-1)
    values = powers @ coeffs
    if not derivative:
        return m.long(), values, None
    dpowers = torch.cat(
        [torch.zeros_like(f), torch.ones_like(f)] + [p * f ** (p - 1) for p in range(2, order + 1)], dim=-1
    )
    slopes = (dpowers @ coeffs) / h * inside.unsqueeze(-1).to(x.dtype)  # zero slope where clamped
    return m.long(), values, slopes


def bspline_bases(x: torch.Tensor, lo: float, h: float, grid_size: int, order: int) -> torch.Tensor:
    """Dense B-spline bases (…, in, G+k) of a uniform grid, inputs clamped to [lo, hi] (the k+1
    non-zero ones scattered into zeros: the CPU path and the reference for `dense_bases`)."""
    m, values, _ = _local_bases(x, lo, h, grid_size, order)
    index = m.unsqueeze(-1) + torch.arange(order + 1, device=x.device)
    return x.new_zeros(*x.shape, grid_size + order).scatter_(-1, index, values)


# Which basis form the spline layer uses (module docstring): the local one unless set True.
CLOSED_FORM = False


_COMPILED: dict[bool, object] = {}


def _fused_bases(x: torch.Tensor, lo: float, h: float, grid_size: int, order: int, derivative: bool = False):
    """`dense_bases`, on CUDA compiled into one kernel by torch.compile (eagerly it is ~15 passes over
    the (rows, in, G+k) tensor, which made LoRA-KAN 12x LoRA's step on an H200). One compile serves
    every shape (dynamic=True); the CPU keeps the eager form (compiling costs more than it saves there)."""
    if x.device.type != "cuda" or torch.compiler.is_compiling():
        return dense_bases(x, lo, h, grid_size, order, derivative)
    if derivative not in _COMPILED:
        _COMPILED[derivative] = torch.compile(
            functools.partial(dense_bases, derivative=derivative), dynamic=True, fullgraph=True
        )
    return _COMPILED[derivative](x, lo, h, grid_size, order)


CHUNK_ELEMENTS = 1 << 23  # dense-basis elements per row block (32 MiB in float32)


def _row_blocks(n_rows: int, in_features: int, n_bases: int):
    """Row slices whose dense bases (rows, in·(G+k)) stay under CHUNK_ELEMENTS: the temporaries of a
    KAN layer are then bounded by the block, not by B·T (a 3072->768 layer at B=8, T=512 once held
    ~6.9 GB of int64 indices and dense bases at once)."""
    rows = max(1, CHUNK_ELEMENTS // (in_features * n_bases))
    return [slice(start, start + rows) for start in range(0, n_rows, rows)]


class _SplineLinear(torch.autograd.Function):
    """y = bases(x).view(N, in·(G+k)) @ c.view(out, in·(G+k))ᵀ, saving only x and c; the bases are
    built (and rebuilt in backward) one row block at a time."""

    @staticmethod
    def forward(ctx, x, coeff, lo, h, grid_size, order):
        ctx.save_for_backward(x, coeff)
        ctx.grid = (lo, h, grid_size, order)
        flat = coeff.flatten(1).t()  # (in·(G+k), out)
        out = x.new_empty(x.shape[0], coeff.shape[0])
        closed = CLOSED_FORM
        for rows in _row_blocks(x.shape[0], x.shape[1], grid_size + order):
            if closed:
                bases = _fused_bases(x[rows], lo, h, grid_size, order)[0]
            else:
                bases = bspline_bases(x[rows], lo, h, grid_size, order)
            torch.matmul(bases.flatten(1), flat, out=out[rows])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, coeff = ctx.saved_tensors
        lo, h, grid_size, order = ctx.grid
        need_x, need_coeff = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.empty_like(x) if need_x else None
        grad_coeff = torch.zeros_like(coeff).flatten(1) if need_coeff else None
        closed = CLOSED_FORM
        offsets = torch.arange(order + 1, device=x.device)
        for rows in _row_blocks(x.shape[0], x.shape[1], grid_size + order):
            if closed:  # dense bases and slopes, one fused kernel on CUDA
                bases, slopes = _fused_bases(x[rows], lo, h, grid_size, order, derivative=need_x)
                if need_coeff:
                    grad_coeff.addmm_(grad_out[rows].t(), bases.flatten(1))
                if need_x:
                    grad_bases = (grad_out[rows] @ coeff.flatten(1)).view_as(bases)
                    grad_x[rows] = (grad_bases * slopes).sum(-1)
                continue
            m, values, slopes = _local_bases(x[rows], lo, h, grid_size, order, derivative=need_x)
            index = m.unsqueeze(-1) + offsets
            if need_coeff:
                bases = x.new_zeros(*values.shape[:-1], grid_size + order).scatter_(-1, index, values)
                grad_coeff.addmm_(grad_out[rows].t(), bases.flatten(1))
            if need_x:
                grad_bases = (grad_out[rows] @ coeff.flatten(1)).view(*m.shape, grid_size + order)
                grad_x[rows] = (grad_bases.gather(-1, index) * slopes).sum(-1)
        return grad_x, None if grad_coeff is None else grad_coeff.view_as(coeff), None, None, None, None


class KANLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        grid_range: tuple[float, float] = (-1.0, 1.0),
        spline_order: int = 3,
        base: str = "silu",
        bias: bool = False,
        zero_init: bool = False,
        spline_noise: float = 0.1,
    ) -> None:
        super().__init__()
        if spline_order not in SUPPORTED_ORDERS:
            raise ValueError(f"spline_order must be one of {list(SUPPORTED_ORDERS)}, got {spline_order}")
        if base not in BASE_FUNCTIONS:
            raise ValueError(f"unknown KAN base function {base!r}; choose from {list(BASE_FUNCTIONS)}")
        if grid_size < 1 or not grid_range[0] < grid_range[1]:
            raise ValueError(f"bad KAN grid: size {grid_size}, range {grid_range}")
        self.in_features, self.out_features = in_features, out_features
        self.spline_order, self.base = spline_order, base
        self.grid_size = grid_size
        self.kernel = "torch"  # the spline GEMM's implementation (`use_spline_kernel`), not part of the weights
        self.lo = float(grid_range[0])
        self.h = (float(grid_range[1]) - self.lo) / grid_size
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_coeff = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # The grid travels with the weights (state dict / saved adapters): it can change by update_grid.
        self.register_buffer("grid_info", torch.tensor([self.lo, self.h, float(grid_size)], dtype=torch.float64))
        if zero_init:
            nn.init.zeros_(self.base_weight)
            nn.init.zeros_(self.spline_coeff)
        else:
            nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
            nn.init.normal_(self.spline_coeff, std=spline_noise / math.sqrt(in_features))

    @property
    def hi(self) -> float:
        return self.lo + self.h * self.grid_size

    def base_fn(self, x: torch.Tensor) -> torch.Tensor:
        return BASE_FUNCTIONS[self.base](x)

    def spline(self, x: torch.Tensor) -> torch.Tensor:
        # The bases and their matmul run in the coefficients' precision, outside autocast (bf16 bases
        # would mix dtypes inside the custom function and lose the partition of unity).
        function = _SplineLinear
        if self.kernel == "triton":
            from modules.kan_triton import TritonSplineLinear  # imports triton: only where it is asked for

            function = TritonSplineLinear
        with torch.autocast(device_type=x.device.type, enabled=False):
            return function.apply(
                x.to(self.spline_coeff.dtype), self.spline_coeff, self.lo, self.h, self.grid_size, self.spline_order
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        base = F.linear(self.base_fn(flat), self.base_weight, self.bias)
        y = base + self.spline(flat).to(base.dtype)  # the run's precision out (bf16 under autocast)
        return y.view(*shape[:-1], self.out_features)

    # ---- grid update that keeps the function ----
    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, refine: int = 1) -> None:
        """Extend the grid by whole intervals to cover the observed activations `x` (…, in), then
        split every interval into `refine` parts. The old knots stay knots, so the old spline is
        exactly representable and the function is unchanged for inputs inside the old grid.
        The coefficient tensor changes shape: rebuild the optimizer afterwards."""
        order = self.spline_order
        low, high = float(x.min()), float(x.max())
        left = max(0, math.ceil((self.lo - low) / self.h - 1e-9))
        right = max(0, math.ceil((high - self.hi) / self.h - 1e-9))
        coeff = self.spline_coeff.data
        # Same spacing, shifted origin: old basis B_j is new basis B_{j+left}; new bases start at zero.
        coeff = torch.cat(
            [coeff.new_zeros(*coeff.shape[:2], left), coeff, coeff.new_zeros(*coeff.shape[:2], right)], dim=-1
        )
        lo, grid_size, h = self.lo - left * self.h, self.grid_size + left + right, self.h
        if refine > 1:
            # Knot insertion by least squares on points covering every new interval: exact, since
            # the old (unclamped) spline lies in the refined space.
            samples = (
                lo
                + h
                * grid_size
                * torch.linspace(
                    0, 1, 4 * refine * grid_size * (order + 1) + 1, dtype=torch.float64, device=coeff.device
                )[:-1]
            )
            old = bspline_bases(samples, lo, h, grid_size, order)  # (S, G+k)
            new_size, new_h = grid_size * refine, h / refine
            new = bspline_bases(samples, lo, new_h, new_size, order)  # (S, G'+k)
            target = coeff.double().flatten(0, 1) @ old.t()  # (out·in, S)
            solution = torch.linalg.lstsq(new, target.t()).solution  # (G'+k, out·in)
            coeff = solution.t().reshape(*coeff.shape[:2], -1).to(self.spline_coeff.dtype)
            grid_size, h = new_size, new_h
        self.lo, self.h, self.grid_size = lo, h, grid_size
        self.grid_info.copy_(torch.tensor([lo, h, float(grid_size)], dtype=torch.float64))
        self.spline_coeff = nn.Parameter(coeff.contiguous(), requires_grad=self.spline_coeff.requires_grad)

    @torch.no_grad()
    def set_grid(self, grid_info: torch.Tensor) -> None:
        """Adopt a saved grid (lo, h, G) before loading coefficients saved on it (shape G + k)."""
        lo, h, grid_size = float(grid_info[0]), float(grid_info[1]), int(grid_info[2])
        if (lo, h, grid_size) == (self.lo, self.h, self.grid_size):
            return
        self.lo, self.h, self.grid_size = lo, h, grid_size
        self.grid_info.copy_(grid_info.to(torch.float64))
        shape = (self.out_features, self.in_features, grid_size + self.spline_order)
        self.spline_coeff = nn.Parameter(
            self.spline_coeff.new_zeros(shape), requires_grad=self.spline_coeff.requires_grad
        )

    def regularization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L1, entropy) of the edge functions, from coefficient magnitudes (efficient-kan's proxy of
        the paper's activation-based L1): l1_ji = mean_k |c_jik|, p = l1 / Σ l1, H = -Σ p log p."""
        l1 = self.spline_coeff.abs().mean(-1)
        total = l1.sum()
        p = l1 / total.clamp_min(1e-12)
        return total, -(p * (p + 1e-12).log()).sum()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, grid={self.grid_size} on "
            f"[{self.lo:g}, {self.hi:g}], order={self.spline_order}, base={self.base}"
        )


def check_spline_kernel(kernel: str, device: str) -> None:
    """ValueError when `kernel` is unknown or cannot run on `device`: Triton kernels need a CUDA device
    (or the CPU interpreter, `TRITON_INTERPRET=1`, for tests)."""
    if kernel not in SPLINE_KERNELS:
        raise ValueError(f"unknown KAN spline kernel {kernel!r}; choose from {list(SPLINE_KERNELS)}")
    if kernel == "triton" and not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--kan_kernel triton needs a CUDA device (this run: {device}); use --kan_kernel torch")


def use_spline_kernel(model: nn.Module, kernel: str, device: str) -> int:
    """Run every KAN layer's spline GEMM with `kernel` ("torch" or "triton"); returns how many layers."""
    check_spline_kernel(kernel, device)
    layers = [module for module in model.modules() if isinstance(module, KANLinear)]
    for layer in layers:
        layer.kernel = kernel
    return len(layers)


def kan_regularization(model: nn.Module, l1_weight: float = 1.0, entropy_weight: float = 1.0) -> torch.Tensor:
    """Auxiliary loss summed over every KANLinear in `model`; the trainer adds it to the task loss."""
    total = None
    for module in model.modules():
        if isinstance(module, KANLinear):
            l1, entropy = module.regularization()
            term = l1_weight * l1 + entropy_weight * entropy
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def kan_aux_loss(model: nn.Module, config) -> torch.Tensor | None:
    """The KAN regulariser as a variant's auxiliary loss (None when both weights are 0)."""
    if not (config.kan_l1 or config.kan_entropy):
        return None
    return kan_regularization(model, config.kan_l1, config.kan_entropy)


def kan_grids(model: nn.Module, config=None) -> dict[str, torch.Tensor]:
    """The grids of every KAN layer: saved with the adapters, since `update_grid` can change them."""
    return {
        f"{name}.grid_info": module.grid_info for name, module in model.named_modules() if isinstance(module, KANLinear)
    }


def adopt_kan_grids(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Resize KAN coefficients to saved grids before the coefficients saved on them are loaded."""
    for name, grid in tensors.items():
        if name.endswith(".grid_info"):
            module = model.get_submodule(name.rpartition(".")[0])
            if isinstance(module, KANLinear):
                module.set_grid(grid)
