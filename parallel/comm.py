"""Named collectives that record the bytes they move, so tests and benchmarks can compare
traffic with the formulas of the parallel-training literature.

A `None` group, or a group of one rank, means "no communication": every helper is then the
identity, which is how the same layers run on a single process with no process group at all.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

# op name -> bytes of the logical buffer each call handled (the all-reduced tensor; the full,
# gathered tensor for all-gather and reduce-scatter; the sent tensor for p2p).
TRAFFIC: Counter = Counter()
CALLS: Counter = Counter()


def reset_traffic() -> None:
    TRAFFIC.clear()
    CALLS.clear()


def _record(op: str, tensor: torch.Tensor) -> None:
    TRAFFIC[op] += tensor.numel() * tensor.element_size()
    CALLS[op] += 1


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(tensor: torch.Tensor, group, async_op: bool = False, op=dist.ReduceOp.SUM, name="all_reduce"):
    """In-place reduction (sum by default) across `group`; returns the work handle when async_op."""
    if group_size(group) == 1:
        return None
    _record(name, tensor)
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def all_reduce_start(tensor: torch.Tensor, group):
    """Launch an all-reduce of a copy of `tensor`; returns `finish()`, which waits and returns the sum."""
    out = tensor.contiguous()
    work = all_reduce(out, group, async_op=True)
    return (lambda: out) if work is None else (lambda: (work.wait(), out)[1])


def _gather_dim0(tensor: torch.Tensor, group, async_op: bool):
    n = group_size(group)
    out = torch.empty((n * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    work = dist.all_gather_into_tensor(out, tensor.contiguous(), group=group, async_op=async_op)
    return out, work


def all_gather(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`."""
    n = group_size(group)
    if n == 1:
        return tensor
    dim = dim % tensor.dim()
    if all(s == 1 for s in tensor.shape[:dim]):  # gathering on dim 0 of the same memory
        out, _ = _gather_dim0(tensor.reshape(tensor.shape[dim:]), group, False)
        out = out.view(*tensor.shape[:dim], *out.shape)
    else:
        out, _ = _gather_dim0(tensor.movedim(dim, 0), group, False)
        out = out.movedim(0, dim).contiguous()
    _record("all_gather", out)
    return out


def reduce_scatter_start(tensor: torch.Tensor, group, dim: int = 0):
    """Launch a reduce-scatter along `dim` asynchronously; returns `finish()`, which waits and
    returns this rank's summed slice. Lets the caller compute while the collective runs."""
    n = group_size(group)
    if n == 1:
        return lambda: tensor
    dim = dim % tensor.dim()
    if tensor.shape[dim] % n:
        raise ValueError(f"reduce_scatter: size {tensor.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    _record("reduce_scatter", tensor)
    moved = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // n, *moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    work = dist.reduce_scatter_tensor(out, moved, group=group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return out.movedim(0, dim).contiguous() if dim else out
    return finish


def reduce_scatter(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Sum across `group`, then keep this rank's slice of `dim`."""
    return reduce_scatter_start(tensor, group, dim)()


def split(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of `dim` (no communication)."""
    n = group_size(group)
    if n == 1:
        return tensor
    if tensor.shape[dim] % n:
        raise ValueError(f"split: size {tensor.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    return tensor.chunk(n, dim)[group_rank(group)].contiguous()
