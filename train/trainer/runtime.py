"""How the maths is executed: the device, the compute precision and its autocast context, and the CUDA
kernel settings every entry point trains and evaluates under. None of it is part of a run's identity
(RuntimeSettings in train/base/settings.py); the resolved precision is recorded in the run's config.json."""

from __future__ import annotations

import contextlib

import torch


def check_device(name: str) -> None:
    """ValueError naming `--device` when this machine cannot run on it."""
    kind = name.split(":")[0]
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r} unknown; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    index = name.partition(":")[2]
    if index and (kind not in ("cuda", "mps") or not index.isdigit()):
        raise ValueError(f"--device {name!r} unknown; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine")


def resolve_precision(precision: str, device: str) -> str:
    """`auto`: bf16 on a CUDA GPU with bf16 support (flash attention and tensor cores), fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def autocast_for(device: str, precision: str, cache: bool = True) -> torch.autocast:
    """bf16 autocast for a resolved precision of `bf16`, a no-op context for `fp32`; training, its
    evaluations and `train.evaluate` all compute under this one context, so they score alike.
    `cache=False` inside a CUDA graph (autocast's cache of bf16 weight copies would be baked in)."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache)


@contextlib.contextmanager
def cuda_kernel_settings():
    """While the block runs (no effect on the CPU), then the caller's own settings again, so an in-process
    caller (a notebook, a test) keeps exact fp32 and its attention backends afterwards:
    - TF32 tensor cores for fp32 matmuls;
    - no cuDNN attention: PyTorch prefers it on Hopper, and it builds a plan for every new sequence
      length, measured on an H100 (torch 2.11, bf16, B=32, 12 heads) at 110-185 ms per new length for
      forward+backward against ~1 ms with flash / memory-efficient attention. Our batches are padded to
      their longest example, so nearly every batch is a new length."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.cudnn_sdp_enabled(),
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.backends.cuda.enable_cudnn_sdp(saved[2])
