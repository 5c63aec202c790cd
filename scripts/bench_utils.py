"""Small timing and memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from train.trainer.distributed import device_synchronize


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time of `fn()` in seconds, `device` synchronised before and after each call (a GPU
    runs asynchronously: without the sync the clock measures kernel launches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        device_synchronize(device)
        start = time.perf_counter()
        fn()
        device_synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct tensors autograd saves for backward while running `fn()` (parameters
    excluded): the activation memory a training step holds between forward and backward."""
    storages: dict[int, int] = {}
    params: set[int] = set()

    def pack(tensor: torch.Tensor):
        if tensor.is_sparse:  # (FRoD's sparse core) no single storage: its indices and values
            for part in (tensor._indices(), tensor._values()):
                storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
        elif not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        else:
            params.add(id(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())
