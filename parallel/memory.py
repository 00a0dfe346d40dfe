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
