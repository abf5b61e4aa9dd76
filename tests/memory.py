"""Peak memory of tensors on any device, counted by torch's dispatcher: what a CPU test can
measure of a stage's accelerator memory (the CPU has no allocator statistics)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakMemory(TorchDispatchMode):
    """While active, the bytes of tensor storage allocated and still alive, and their peak.

    Storages that existed before (a model's weights) are not counted; a storage is counted once
    however many views of it are made, and given back when it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and _address(tensor) not in inputs:
                self._count(tensor.untyped_storage())  # new memory, not a view or in-place
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._alive or storage.nbytes() == 0:
            return
        self._alive.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._alive.discard(key)
        self.live -= nbytes


def _address(tensor: torch.Tensor) -> int:
    """Where a tensor's storage starts (shared by its views)."""
    return tensor.untyped_storage().data_ptr()
