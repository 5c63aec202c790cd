"""Fused linear + cross-entropy for the LM head: loss = CE(h Wᵀ, y), gradients computed in forward.

    logits = h Wᵀ                     # (N, V), one row block at a time
    p = softmax(logits);  p[y] -= 1;  p /= n_valid     # dloss/dlogits, in place
    dh = p W;  dW += pᵀ h             # what backward will return (times the incoming grad)

Plain autograd materialises the (N, V) logits, their log-softmax, a zero-filled slice gradient and
the log-softmax gradient: four ~200 MB tensors at B=8, T=128 for GPT-2's 50,257-token vocabulary.
Here one (rows, V) block is reused in place, rows with the ignore label get weight 0 (no
data-dependent shapes, so no host sync and no graph break), and dW is skipped when W is frozen.
Same maths, same numbers: in fp32 against `F.cross_entropy` to float32 noise; under bf16 autocast the
matmuls run in bf16 as HF's do, and the tests compare against HF's autocast loss and gradients.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward returns the loss and keeps dL/dh and dL/dW (computed block by block) for backward.

    `matmul_dtype` is the precision of the three matmuls (logits, dL/dh, dL/dW): bf16 in a bf16 run,
    as HF's LM head under autocast computes them (bf16 inputs, fp32 accumulation, bf16 products), while
    the softmax, the loss and the sum of dW over blocks stay fp32; or fp32 (on CUDA, TF32 when it is
    allowed). Autocast itself is off inside: the dtypes are explicit.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, matmul_dtype: torch.dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            total, grad_h, grad_w = _blocks(hidden, weight, targets, chunk_rows, need_h, need_w, matmul_dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # The incoming scale (1, or a loss weight / grad_accum share) multiplies the gradients kept in
        # forward, after their bf16 products were rounded; HF scales dL/dlogits before its bf16 matmuls.
        # The two differ at bf16 rounding only when the loss is scaled.
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (
            None if grad_h is None else (grad_h * grad_out).to(h_dtype),
            None if grad_w is None else (grad_w * grad_out).to(w_dtype),
            None,
            None,
            None,
        )


def _blocks(hidden, weight, targets, chunk_rows: int, need_h: bool, need_w: bool, matmul_dtype=torch.float32):
    """Mean loss over the rows whose target is kept, and (optionally) its gradients, in float32; the
    matmuls in `matmul_dtype` (their products rounded to it, then used in float32).

    Ignored rows are weighted 0 instead of being selected out: no data-dependent shapes, no host
    sync, no graph break under torch.compile (they cost their share of the matmuls; bucketing keeps
    padding small)."""
    low = matmul_dtype != torch.float32
    hidden, weight = hidden.to(matmul_dtype), weight.to(matmul_dtype)
    keep = targets != IGNORE_INDEX
    n_valid = keep.sum().clamp(min=1).float()
    safe = targets.clamp(min=0)  # ignored rows point at class 0 and are weighted 0
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for start in range(0, hidden.shape[0], chunk_rows):
        h = hidden[start : start + chunk_rows]
        y = safe[start : start + chunk_rows]
        row_weight = keep[start : start + chunk_rows].float() / n_valid
        logits = (h @ weight.t()).float()  # (rows, V); a copy in fp32 when the matmul ran in bf16
        lse = torch.logsumexp(logits, dim=-1)
        total = total + ((lse - logits.gather(1, y[:, None]).squeeze(1)) * row_weight).sum()
        if need_h or need_w:
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            probs.scatter_add_(1, y[:, None], -torch.ones_like(y[:, None], dtype=probs.dtype))  # p[y] -= 1
            probs.mul_(row_weight[:, None])
            probs = probs.to(matmul_dtype)  # dL/dlogits enters the backward matmuls at their precision
            if need_h:
                grad_h[start : start + chunk_rows] = probs @ weight
            if need_w:
                if low:  # the block's product at the matmul precision, summed over blocks in fp32
                    grad_w.add_(probs.t() @ h)
                else:
                    grad_w.addmm_(probs.t(), h)
    return total, grad_h, grad_w


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_rows: int = 4096,
    check: bool = True,
    fp32: bool = False,
) -> torch.Tensor:
    """Mean CE of `hidden @ weight.T` against `targets` over rows whose target is not ignored.

    hidden: (N, C), weight: (V, C), targets: (N,). Returns a float32 scalar; 0 if nothing is valid.
    `check=False` skips the label-range check (targets built from ids already checked). The matmuls
    run at the run's precision: bf16 under bf16 autocast (as HF's autocast LM head), else fp32;
    `fp32=True` keeps them in fp32 under autocast too.
    """
    if ignore_index != IGNORE_INDEX:
        targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
    if check and not torch.compiler.is_compiling():
        valid = (targets == IGNORE_INDEX) | ((targets >= 0) & (targets < weight.shape[0]))
        if targets.device.type == "cpu":  # free on CPU; on a GPU a check here would stall the host
            if not bool(valid.all()):
                raise ValueError(f"label ids must be in [0, {weight.shape[0]}) or {ignore_index} (ignored)")
        else:
            torch._assert_async(valid.all(), f"label ids must be in [0, {weight.shape[0]}) or {ignore_index}")
    kind = hidden.device.type
    autocast_bf16 = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
    matmul_dtype = torch.bfloat16 if autocast_bf16 and not fp32 else torch.float32
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        with torch.autocast(kind, enabled=False):  # evaluation: no gradients to precompute
            return _blocks(hidden, weight, targets, chunk_rows, False, False, matmul_dtype)[0]
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, matmul_dtype)


def next_token_targets(
    input_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Targets aligned with each position (the next token), HF's convention for `labels`.

    Position t is trained to predict labels[t + 1]; the last position and every position whose
    target is padding (attention_mask 0) or `IGNORE_INDEX` contribute nothing.
    """
    labels = input_ids if labels is None else labels
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        targets[:, :-1] = targets[:, :-1].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return targets
