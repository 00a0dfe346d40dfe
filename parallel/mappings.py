"""The communication vocabulary of tensor and sequence parallelism (Megatron-core's mappings).

Each autograd Function is a forward collective paired with its conjugate backward:

    copy_to_tp            identity        / all-reduce
    reduce_from_tp        all-reduce      / identity
    scatter_to_tp         split last dim  / all-gather last dim
    gather_from_tp        all-gather last / split last dim
    scatter_to_sp         split seq dim   / all-gather seq dim
    gather_from_sp        all-gather seq  / reduce-scatter seq
    reduce_scatter_to_sp  reduce-scatter  / all-gather seq

Activations are batch-first, [batch, seq, hidden]: the sequence dimension is 1.
"""
from __future__ import annotations

import torch

from parallel import comm

SEQ_DIM = 1


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
        return comm.split(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, SEQ_DIM), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.reduce_scatter(grad, ctx.group, SEQ_DIM), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, SEQ_DIM), None


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
