"""Tensor memory without allocator statistics (CPU tensors have none; meta tensors have no
allocator): we watch the operators instead. While the mode is active every storage an operator
creates is remembered through a weak reference until it dies, so the bytes alive at any moment,
and their peak, are known. `SavedActivationMemory` asks it, after a forward pass, what autograd
kept for the backward (the storages still alive, minus the result). This counts the same thing on
CPU, GPU and meta, and sees through activation checkpointing.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class PeakTensorMemory(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while active: every storage an op produces
    is remembered through a weak reference until it dies, and after each op the live total is
    compared with the peak so far. What a CUDA allocator's `max_memory_allocated` reports,
    without its rounding, for CPU tensors too, and for meta tensors (their would-be bytes).
    Storages made before the mode are not seen; `reset_peak()` starts a new peak from now."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0  # bytes of the live storages
        self.peak = 0

    def _forget_freed(self) -> None:
        for cdata in [c for c, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(cdata)[1]

    def reset_peak(self) -> int:
        """Start the peak afresh at the bytes alive now; returns them."""
        self._forget_freed()
        self.peak = self.current
        return self.current

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
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)  # the op's inputs and outputs alive together
        return out


class SavedActivationMemory(PeakTensorMemory):
    """Used around a forward pass: `live_bytes()` afterwards is what it left alive for the
    backward (made before the mode, parameters and inputs are not counted; pass the result in
    `exclude`)."""

    def live_bytes(self, exclude=()) -> int:
        self._forget_freed()
        excluded = {t.untyped_storage()._cdata for t in exclude}
        return self.current - sum(n for c, (_, n) in self.live.items() if c in excluded)

