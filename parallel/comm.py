"""Named collectives that record the bytes they move, so tests and benchmarks can compare
traffic with the formulas of the parallel-training literature.

On gloo (CPU) groups, reduce-scatter and all-gather run as rings of point-to-point messages
(`parallel.ring`): 0.32–0.46× and 0.75–0.94× the time of gloo's own on 2 ranks
(`python -m benchmarks.ring_collectives`). All-reduce stays gloo's, which is faster than the ring.

A `None` group, or a group of one rank, means "no communication": every helper is then the
identity, which is how the same layers run on a single process with no process group at all.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from parallel import ring

# op name -> bytes of the buffer each call handled: the all-reduced tensor; the full (gathered)
# tensor for all-gather and reduce-scatter; the sent tensor for p2p. What crosses the wire per
# rank follows from it with the ring factors of `wire_bytes`.
TRAFFIC: Counter = Counter()
CALLS: Counter = Counter()


def reset_traffic() -> None:
    TRAFFIC.clear()
    CALLS.clear()


def _record(op: str, tensor: torch.Tensor) -> None:
    TRAFFIC[op] += tensor.numel() * tensor.element_size()
    CALLS[op] += 1


# torch 2.13 renamed the single-tensor collectives (the old names warn); older releases lack the new.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

RING_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}


def wire_bytes(op: str, buffer_bytes: int, n: int) -> float:
    """Bytes one rank sends for a ring collective over n ranks: all-reduce 2(n-1)/n of the
    buffer, all-gather and reduce-scatter (n-1)/n each (point-to-point: the buffer itself)."""
    return RING_FACTOR.get(op, n / (n - 1)) * (n - 1) / n * buffer_bytes


def _ring(group, tensor: torch.Tensor) -> bool:
    """Whether to run the collective as a ring: CPU tensors on a gloo group of several ranks."""
    return tensor.numel() > 0 and tensor.device.type == "cpu" and group_size(group) > 1 and ring.is_gloo(group)


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


_SUBGROUPS: dict = {}


def block_subgroup(group, size: int):
    """The group of the `size` consecutive members of `group` that include this rank (None for
    one rank), created once. Only those members create it (local synchronisation), so a rank
    may ask whenever it builds the layer that needs it; it gets the world group's timeout."""
    if size == 1 or group is None:
        return None
    members = dist.get_process_group_ranks(group)
    mine = members.index(dist.get_rank())
    return subgroup(members[mine - mine % size: mine - mine % size + size])


def forget_subgroups() -> None:
    """Drop the cached sub-groups: call when the world they belong to is destroyed (the dry run
    and the planner make and destroy many fake worlds in one process)."""
    _SUBGROUPS.clear()


def subgroup(ranks) -> object:
    """The group of `ranks` (global ranks, this one among them), created once, by its members
    only (local synchronisation), with the world group's timeout."""
    key = (id(dist.group.WORLD), tuple(ranks))
    if key not in _SUBGROUPS:
        from parallel.topology import world_timeout
        timeout = world_timeout()
        _SUBGROUPS[key] = dist.new_group(list(ranks), use_local_synchronization=True,
                                         **({"timeout": timeout} if timeout else {}))
    return _SUBGROUPS[key]


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


def all_gather_start(tensor: torch.Tensor, group, dim: int = 0):
    """Launch an all-gather along `dim` asynchronously; returns `finish()`, which waits and
    returns every rank's `tensor` concatenated along `dim`."""
    n = group_size(group)
    if n == 1:
        return lambda: tensor
    dim = dim % tensor.dim()
    shard = tensor.contiguous()
    # The collective stacks the shards on a new leading dim: [n, *shard.shape], no copy of the
    # input. Moving that dim next to `dim` costs one copy, none when the dims before it are 1.
    out = torch.empty((n, *shard.shape), dtype=tensor.dtype, device=tensor.device)
    _record("all_gather", out)
    flat_out = out.view(n * shard.shape[0], *shard.shape[1:])
    if _ring(group, shard):
        wait = ring.all_gather_start(shard, group, out=flat_out)
    else:
        wait = _all_gather_single(flat_out, shard, group=group, async_op=True).wait

    def finish() -> torch.Tensor:
        wait()
        return out.movedim(0, dim).flatten(dim, dim + 1)
    return finish


def all_gather(tensor: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`."""
    return all_gather_start(tensor, group, dim)()


def all_gather_into_start(out: torch.Tensor, shard: torch.Tensor, group):
    """Launch filling the flat `out` with every rank's flat `shard` (which may be a view of
    `out`); returns `finish()`, which waits. `out` must not be read until then."""
    if group_size(group) == 1:
        return lambda: None
    _record("all_gather", out)
    if _ring(group, shard):
        return ring.all_gather_start(shard, group, out=out)
    work = _all_gather_single(out, shard.clone(), group=group, async_op=True)
    return work.wait


def all_gather_into(out: torch.Tensor, shard: torch.Tensor, group) -> None:
    """Fill the flat `out` with every rank's flat `shard` (which may be a view of `out`)."""
    all_gather_into_start(out, shard, group)()


def reduce_scatter_start(tensor: torch.Tensor, group):
    """Launch a reduce-scatter of the leading dim asynchronously: rank r keeps rows
    [r·m, (r+1)·m) of the sum (m = rows / n); returns `finish()`, which waits and returns them.
    Lets the caller compute while the collective runs. (Sequence parallelism reduce-scatters
    tokens in memory order, so every caller's slice is a leading-dim block: no copy first.)"""
    n = group_size(group)
    if n == 1:
        return lambda: tensor
    if tensor.shape[0] % n:
        raise ValueError(f"reduce_scatter: {tensor.shape[0]} rows are not divisible by {n} ranks")
    _record("reduce_scatter", tensor)
    flat = tensor.contiguous()
    if _ring(group, flat):
        return ring.reduce_scatter_start(flat, group)
    out = torch.empty((tensor.shape[0] // n, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    work = _reduce_scatter_single(out, flat, group=group, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return out
    return finish


def reduce_scatter(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum across `group`, then keep this rank's block of the leading dim."""
    return reduce_scatter_start(tensor, group)()


def split(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous slice of `dim` (no communication)."""
    n = group_size(group)
    if n == 1:
        return tensor
    if tensor.shape[dim] % n:
        raise ValueError(f"split: size {tensor.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    return tensor.chunk(n, dim)[group_rank(group)].contiguous()
