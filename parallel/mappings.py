"""The communication vocabulary of tensor and sequence parallelism (Megatron-core's mappings).

Each autograd Function is a forward collective paired with its conjugate backward:

    copy_to_tp            identity        / all-reduce
    reduce_from_tp        all-reduce      / identity
    scatter_to_tp         split last dim  / all-gather last dim
    gather_from_tp        all-gather last / split last dim
    scatter_to_sp         split tokens    / all-gather tokens
    gather_from_sp        all-gather      / reduce-scatter tokens
    reduce_scatter_to_sp  reduce-scatter  / all-gather tokens

Activations are batch-first, [batch, seq, hidden]. A sequence-parallel shard is this rank's
n-th of the tokens *in memory order*: rank r holds rows [r·bs/n, (r+1)·bs/n) of the tensor seen
as [batch·seq, hidden], shaped [batch, seq/n, hidden]. With batch 1 that is the r-th chunk of
the sequence, Megatron's split of its [seq, batch, hidden] layout; with batch > 1 it is another
set of tokens, which is fine: only token-wise operations (norms, residual adds) run on shards.
What it buys: every sp collective is a plain collective on contiguous memory, with no copy
before or after (splitting dim 1 of [batch, seq, hidden] costs a strided copy per collective).
"""
from __future__ import annotations

import torch

from parallel import comm

SEQ_DIM = 1


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:])  # [b, s, ...] -> [b·s, ...]: a view when x is contiguous


def _shard_shape(x: torch.Tensor, group) -> tuple[int, ...]:
    """[b, s/n, ...], the shape of x's [b, s, ...] shards; s must divide by n."""
    n = comm.group_size(group)
    if x.shape[SEQ_DIM] % n:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[SEQ_DIM]} is not divisible by tp={n}")
    return (x.shape[0], x.shape[1] // n, *x.shape[2:])


def sp_split(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's sequence-parallel shard of x [b, s, ...]: [b, s/n, ...] (no communication)."""
    return comm.split(_tokens(x), group, 0).view(_shard_shape(x, group))


def sp_all_gather_start(shard: torch.Tensor, group):
    """Launch the all-gather of the shards [b, s/n, ...] into [b, s, ...]; returns `finish()`."""
    finish = comm.all_gather_start(_tokens(shard), group, dim=0)
    shape = (shard.shape[0], shard.shape[1] * comm.group_size(group), *shard.shape[2:])
    return lambda: finish().view(shape)


def sp_reduce_scatter_start(x: torch.Tensor, group):
    """Launch the sum of x [b, s, ...] across `group`, keeping this rank's shard [b, s/n, ...];
    returns `finish()`."""
    shape = _shard_shape(x, group)
    finish = comm.reduce_scatter_start(_tokens(x), group)
    return lambda: finish().view(shape)


def sp_all_gather(shard, group):
    return sp_all_gather_start(shard, group)()


def sp_reduce_scatter(x, group):
    return sp_reduce_scatter_start(x, group)()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        comm.all_reduce(grad, ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # Out of place: under selective recompute the matmul output x is cached and handed out
        # again when the layer is recomputed; summing into it would sum it twice.
        out = x.clone(memory_format=torch.contiguous_format)
        comm.all_reduce(out, group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, -1), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return comm.split(grad, ctx.group, -1), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return sp_split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return sp_all_gather(grad, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return sp_all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return sp_reduce_scatter(grad, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return sp_reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return sp_all_gather(grad, ctx.group), None


def _skip(group) -> bool:
    return comm.group_size(group) == 1


def copy_to_tp(x, group):
    return x if _skip(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if _skip(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x, group):
    return x if _skip(group) else _ScatterToTP.apply(x, group)


def gather_from_tp(x, group):
    return x if _skip(group) else _GatherFromTP.apply(x, group)


def scatter_to_sp(x, group):
    return x if _skip(group) else _ScatterToSP.apply(x, group)


def gather_from_sp(x, group):
    return x if _skip(group) else _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x, group):
    return x if _skip(group) else _ReduceScatterToSP.apply(x, group)
