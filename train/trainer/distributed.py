"""One process or `torchrun --nproc_per_node N`: which device each rank uses, which backend, which seed.

Rules (each one a defect a GPU user would otherwise hit first):
- Under torchrun every rank owns one GPU: `--device cuda` (or `cuda:N`, or auto on a CUDA box) becomes
  `cuda:{LOCAL_RANK}` and `torch.cuda.set_device` is called before the process group starts (NCCL's
  object collectives use the current device). Restrict GPUs with CUDA_VISIBLE_DEVICES, not an index.
- The backend follows the *device*, not the machine: NCCL for CUDA tensors, gloo otherwise, so
  `--device cpu` under torchrun on a GPU box works.
- Dropout and sampling must not be correlated across ranks: the model is built with the run's seed on
  every rank (identical weights and adapter inits), then each rank reseeds with `rank_seed(seed, rank)`
  (rank 0 keeps the run's seed, so a 1-process run is unchanged).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Placement:
    rank: int
    world: int
    local_rank: int
    device: str
    backend: str | None  # None for one process

    @property
    def main(self) -> bool:
        return self.rank == 0


def auto_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def rank_device(requested: str, local_rank: int, world: int) -> str:
    """The device of this rank: `requested` (auto resolved), with CUDA mapped to the rank's own GPU."""
    device = auto_device() if requested == "auto" else requested
    if world > 1 and device.split(":")[0] == "cuda":
        return f"cuda:{local_rank}"
    return device


def backend_for(device: str) -> str:
    return "nccl" if device.split(":")[0] == "cuda" else "gloo"


def device_synchronize(device: str) -> None:
    """Wait for the device's queued work (kernels launch asynchronously: a clock read without this
    measures the launch, not the step). The index matters: a bare synchronize() waits on cuda:0."""
    kind = device.split(":")[0]
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def rank_seed(seed: int, rank: int) -> int:
    return seed if rank == 0 else seed + 1_000_003 * rank


def setup(requested: str) -> Placement:
    """Read torchrun's environment, pick the device and backend, start the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(requested, local_rank, world)
    if world == 1:
        if device.split(":")[0] == "cuda" and ":" in device:
            torch.cuda.set_device(device)
        return Placement(0, 1, 0, device, None)
    if requested.split(":")[0] == "cuda" and ":" in requested and local_rank == 0:
        print(
            f"--device {requested} under torchrun: each rank uses cuda:LOCAL_RANK; choose GPUs with "
            "CUDA_VISIBLE_DEVICES",
            file=sys.stderr,
        )
    backend = backend_for(device)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Placement(dist.get_rank(), world, local_rank, device, backend)
