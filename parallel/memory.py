"""Activation memory: the bytes a forward pass leaves alive for its backward.

CPU tensors have no allocator statistics, so we watch the operators instead: while the mode is
active every output storage is remembered through a weak reference; after the forward, the
storages still alive (minus parameters, inputs and the result) are what autograd kept. This
counts the same thing on CPU and GPU, and sees through activation checkpointing.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class SavedActivationMemory(TorchDispatchMode):
    """Records a weak reference to the storage of every tensor an op produces while active;
    `live_bytes()` later sums the bytes of those storages still alive (kept for backward)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                # Weak refs keep the StorageImpl's address reserved, so a cdata never names two storages.
                self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self, exclude=()) -> int:
        excluded = {t.untyped_storage()._cdata for t in exclude}
        return sum(nbytes for cdata, (ref, nbytes) in self.storages.items()
                   if cdata not in excluded and not ref.expired())


class PeakTensorMemory(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while active: every storage an op produces
    is remembered through a weak reference until it dies, and after each op the live total is
    compared with the peak so far. What a CUDA allocator's `max_memory_allocated` reports,
    without its rounding, for CPU tensors too, and for meta tensors (their would-be bytes).
    Storages made before the mode are not seen; `reset_peak()` starts a new peak from now."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.peak = 0

    def _forget_freed(self) -> None:
        for cdata in [c for c, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(cdata)[1]

    def reset_peak(self) -> int:
        """Start the peak afresh at the bytes alive now; returns them."""
        self._forget_freed()
        self.peak = self.live_bytes
        return self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._forget_freed()  # since the last op
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                # a view or an in-place result is its input's storage: new only if that one was
                if storage._cdata not in self.live and storage._cdata not in inputs:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.live_bytes += storage.nbytes()
        self.peak = max(self.peak, self.live_bytes)  # the op's inputs and outputs alive together
        return out
