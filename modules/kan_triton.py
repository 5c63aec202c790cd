"""KAN's spline GEMM as Triton kernels that build the B-spline bases in registers, inside the matmul.

    y[n, o] = Σ_i Σ_j B_j(x[n, i]) · c[o, i, j]                      x: (N, in), c: (out, in, G+k)

The torch path (`modules.kan._SplineLinear`) writes the bases of a row block to memory,
(rows, in·(G+k)) floats, and reads them back for a GEMM: on a GPU that round trip, not the
arithmetic, sets its cost. Here every program loads a tile of x, finds each input's grid interval
m and offset f (u = clamp((x - lo)/h, 0, G), m = min(⌊u⌋, G-1), f = u - m), evaluates basis j in
registers as the (j - m)-th of the k+1 polynomials alive on interval m (zero for the others), and
feeds the tile straight to `tl.dot` (the FusionKAN / FlashKAN idea). Nothing of size N·in·(G+k) is
ever stored.

Backward stays memory-lean as the torch path does: only x and c are saved, and the bases (and their
slopes) are rebuilt in the two backward kernels:

    dL/dx[n, i]    = Σ_j dB_j/du · [x inside the grid] / h · Σ_o g[n, o] c[o, i, j]
    dL/dc[o, i, j] = Σ_n g[n, o] · B_j(x[n, i])

The same polynomials and the same interval convention as the reference's local form
(`modules.kan._local_bases`: one-sided slopes at knots), so values agree with it to float rounding.
tests/test_kan_triton.py checks values and gradients against the reference under `TRITON_INTERPRET=1`
on the CPU, for several grids and orders.

Dense over the G+k bases, like the reference GEMM: a tile of inputs falls into different grid
intervals, so a tile-wide matmul needs every basis (zeros included). Accumulation is float32; the dot's
input precision follows torch's own matmul setting (`torch.backends.cuda.matmul.allow_tf32`), so
the kernel is exactly as exact as the GEMM it replaces.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 32  # rows, inputs and outputs per tile (tl.dot needs at least 16)


@triton.jit
def _grid_position(x, lo, h, G):
    """Where x falls: interval m = min(floor(u), G-1) and f = u - m, u = (x - lo)/h clamped to [0, G]
    (the reference's convention), and whether x was inside the grid (the slope is 0 outside)."""
    u = (x - lo) / h
    inside = (u >= 0) & (u <= G)
    u = tl.minimum(tl.maximum(u, 0.0), G * 1.0)
    m = tl.minimum(tl.floor(u), G - 1.0)
    return m, u - m, inside


@triton.jit
def _basis(m, f, j, ORDER: tl.constexpr):
    """(B_j, dB_j/du) at u = m + f: zero unless j is one of the k+1 bases alive on interval m, and
    then the t-th (t = j - m) column of the cardinal polynomials in f (`modules.kan._CARDINAL`)."""
    t = j - m
    if ORDER == 1:
        value = tl.where(t == 0, 1 - f, tl.where(t == 1, f, 0.0))
        slope = tl.where(t == 0, -1.0, tl.where(t == 1, 1.0, 0.0))
    elif ORDER == 2:
        g = 1 - f
        value = tl.where(t == 0, 0.5 * g * g, tl.where(t == 1, 0.5 + f - f * f, tl.where(t == 2, 0.5 * f * f, 0.0)))
        slope = tl.where(t == 0, -g, tl.where(t == 1, 1 - 2 * f, tl.where(t == 2, f, 0.0)))
    else:
        g = 1 - f
        f2 = f * f
        value = tl.where(
            t == 0,
            g * g * g / 6,
            tl.where(
                t == 1,
                (4 - 6 * f2 + 3 * f2 * f) / 6,
                tl.where(t == 2, (1 + 3 * f + 3 * f2 - 3 * f2 * f) / 6, tl.where(t == 3, f2 * f / 6, 0.0)),
            ),
        )
        slope = tl.where(
            t == 0,
            -0.5 * g * g,
            tl.where(t == 1, -2 * f + 1.5 * f2, tl.where(t == 2, 0.5 + f - 1.5 * f2, tl.where(t == 3, 0.5 * f2, 0.0))),
        )
    return value, slope


@triton.jit
def _spline_forward(
    x_ptr, c_ptr, y_ptr, N, IN, OUT, lo, h, G,
    stride_co, stride_ci, stride_cj,
    ORDER: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    outs = tl.program_id(1) * BO + tl.arange(0, BO)
    acc = tl.zeros((BN, BO), dtype=tl.float32)
    for start in range(0, IN, BI):
        ins = start + tl.arange(0, BI)
        x_mask = (rows[:, None] < N) & (ins[None, :] < IN)
        x = tl.load(x_ptr + rows[:, None] * IN + ins[None, :], mask=x_mask, other=0.0)
        m, f, _ = _grid_position(x, lo, h, G)
        c_mask = (ins[:, None] < IN) & (outs[None, :] < OUT)
        c_tile = c_ptr + ins[:, None] * stride_ci + outs[None, :] * stride_co
        for j in range(0, G + ORDER):
            basis, _ = _basis(m, f, j, ORDER)
            coeff = tl.load(c_tile + j * stride_cj, mask=c_mask, other=0.0)  # zero past `in`: no junk sums
            acc += tl.dot(basis, coeff, input_precision=PRECISION)
    tl.store(y_ptr + rows[:, None] * OUT + outs[None, :], acc, mask=(rows[:, None] < N) & (outs[None, :] < OUT))


@triton.jit
def _spline_grad_x(
    g_ptr, x_ptr, c_ptr, gx_ptr, N, IN, OUT, lo, h, G,
    stride_co, stride_ci, stride_cj,
    ORDER: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ins = tl.program_id(1) * BI + tl.arange(0, BI)
    x_mask = (rows[:, None] < N) & (ins[None, :] < IN)
    x = tl.load(x_ptr + rows[:, None] * IN + ins[None, :], mask=x_mask, other=0.0)
    m, f, inside = _grid_position(x, lo, h, G)
    acc = tl.zeros((BN, BI), dtype=tl.float32)
    for j in range(0, G + ORDER):
        grad_basis = tl.zeros((BN, BI), dtype=tl.float32)  # Σ_o g[n, o] c[o, i, j]
        for start in range(0, OUT, BO):
            outs = start + tl.arange(0, BO)
            g_mask = (rows[:, None] < N) & (outs[None, :] < OUT)
            g = tl.load(g_ptr + rows[:, None] * OUT + outs[None, :], mask=g_mask, other=0.0)
            c_mask = (outs[:, None] < OUT) & (ins[None, :] < IN)
            c_at = c_ptr + outs[:, None] * stride_co + ins[None, :] * stride_ci + j * stride_cj
            coeff = tl.load(c_at, mask=c_mask, other=0.0)
            grad_basis += tl.dot(g, coeff, input_precision=PRECISION)
        _, slope = _basis(m, f, j, ORDER)
        acc += grad_basis * slope
    acc = tl.where(inside, acc / h, 0.0)
    tl.store(gx_ptr + rows[:, None] * IN + ins[None, :], acc, mask=x_mask)


@triton.jit
def _spline_grad_coeff(
    g_ptr, x_ptr, gc_ptr, N, IN, OUT, lo, h, G,
    stride_co, stride_ci, stride_cj,
    ORDER: tl.constexpr, BN: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    outs = tl.program_id(0) * BO + tl.arange(0, BO)
    ins = tl.program_id(1) * BI + tl.arange(0, BI)
    j = tl.program_id(2)
    acc = tl.zeros((BO, BI), dtype=tl.float32)
    for start in range(0, N, BN):
        rows = start + tl.arange(0, BN)
        row_ok = rows < N
        g_mask = row_ok[:, None] & (outs[None, :] < OUT)
        g = tl.load(g_ptr + rows[:, None] * OUT + outs[None, :], mask=g_mask, other=0.0)
        x_mask = row_ok[:, None] & (ins[None, :] < IN)
        x = tl.load(x_ptr + rows[:, None] * IN + ins[None, :], mask=x_mask, other=0.0)
        m, f, _ = _grid_position(x, lo, h, G)
        basis, _ = _basis(m, f, j, ORDER)
        basis = tl.where(row_ok[:, None], basis, 0.0)  # padding rows add nothing
        acc += tl.dot(tl.trans(g), basis, input_precision=PRECISION)
    mask = (outs[:, None] < OUT) & (ins[None, :] < IN)
    tl.store(gc_ptr + outs[:, None] * stride_co + ins[None, :] * stride_ci + j * stride_cj, acc, mask=mask)


def _precision() -> str:
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


class TritonSplineLinear(torch.autograd.Function):
    """Same contract as `modules.kan._SplineLinear`: (x (N, in), c (out, in, G+k), lo, h, G, k) -> (N, out)
    in float32, saving only x and c."""

    @staticmethod
    def forward(ctx, x, coeff, lo, h, grid_size, order):
        x, coeff = x.contiguous(), coeff.contiguous()
        ctx.save_for_backward(x, coeff)
        ctx.grid = (lo, h, grid_size, order)
        n, inputs = x.shape
        outputs = coeff.shape[0]
        y = x.new_empty(n, outputs)
        launch = (triton.cdiv(n, BLOCK), triton.cdiv(outputs, BLOCK))
        _spline_forward[launch](
            x, coeff, y, n, inputs, outputs, float(lo), float(h), int(grid_size), *coeff.stride(),
            ORDER=order, BN=BLOCK, BI=BLOCK, BO=BLOCK, PRECISION=_precision(),
        )  # fmt: skip
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, coeff = ctx.saved_tensors
        lo, h, grid_size, order = ctx.grid
        grad_out = grad_out.contiguous()
        n, inputs = x.shape
        outputs = coeff.shape[0]
        common = dict(ORDER=order, BN=BLOCK, BI=BLOCK, BO=BLOCK, PRECISION=_precision())
        grad_x = grad_coeff = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            _spline_grad_x[(triton.cdiv(n, BLOCK), triton.cdiv(inputs, BLOCK))](
                grad_out, x, coeff, grad_x, n, inputs, outputs, float(lo), float(h), int(grid_size),
                *coeff.stride(), **common,
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_coeff = torch.empty_like(coeff)
            launch = (triton.cdiv(outputs, BLOCK), triton.cdiv(inputs, BLOCK), grid_size + order)
            _spline_grad_coeff[launch](
                grad_out, x, grad_coeff, n, inputs, outputs, float(lo), float(h), int(grid_size),
                *grad_coeff.stride(), **common,
            )  # fmt: skip
        return grad_x, grad_coeff, None, None, None, None
