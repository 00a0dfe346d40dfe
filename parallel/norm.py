"""RMSNorm (Zhang & Sennrich 2019), sequence-parallel aware, with a hand-written backward.

Numerics are Meta's: normalise in fp32, cast to the activation dtype, then scale by the weight
in that dtype. The autograd Function keeps only the input and the per-token 1/rms for backward
(2 bytes per element in bf16, plus 4 per token), where composing the same ops with autograd
keeps an fp32 copy of the input and the normalised activation as well (8 bytes per element);
the squares are summed without materialising them.

Under sequence parallelism every tp rank normalises a different slice of the sequence, so the
weight's gradient is only a partial sum: the weight enters through copy_to_tp, whose backward
all-reduces that gradient across tp, unless the gradient buckets sum it later with the other
norms' (`sequence_parallel` marks the weight; `parallel.data_parallel`, as the trainer does).
Without sp every rank sees the same input and gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.layers import NO_TP, TensorParallel
from parallel.mappings import copy_to_tp
from parallel.params import make_param


def _inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(x²) + eps) over the last dim, in fp32 (or wider), [..., 1]."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    sum_sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).square_()
    return sum_sq.div_(x.shape[-1]).add_(eps).rsqrt_()


def _mul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a·b computed in their common dtype and stored in `dtype` in the same pass (out= rounds as
    it stores: the same numbers as `(a * b).to(dtype)` without the intermediate)."""
    return torch.mul(a, b, out=torch.empty(a.shape, dtype=dtype, device=a.device))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        inv_rms = _inverse_rms(x, eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return _mul(x, inv_rms, x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        normed = torch.mul(x, inv_rms)  # fp32, recomputed
        grad_weight = None
        if ctx.needs_input_grad[1]:  # Σ grad · the normalised value, rounded as forward rounded it
            grad_weight = normed.to(x.dtype, copy=True).mul_(grad).flatten(0, -2).sum(0)
        # d/dx of x·r: r·(g - n·mean(g·n)), with g the fp32 gradient of the normalised value
        grad_normed = _mul(grad, weight, normed.dtype)
        dot = torch.linalg.vecdot(grad_normed, normed).unsqueeze(-1).div_(x.shape[-1])
        grad_normed.sub_(normed.mul_(dot))
        grad_x = grad_normed.mul_(inv_rms) if x.dtype == normed.dtype else _mul(grad_normed, inv_rms, x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, tp: TensorParallel = NO_TP, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps, self.tp = dim, eps, tp
        self.weight = make_param((dim,), (dim,), None, tp.rank, tp.size, None, device, dtype)
        self.weight.sequence_parallel = tp.sp and tp.size > 1  # its gradient is a partial sum over tp

    def forward(self, x):
        summed_later = getattr(self.weight, "grad_summed_by_buckets", False)
        weight = copy_to_tp(self.weight, self.tp.group) if self.tp.sp and not summed_later else self.weight
        return _RMSNormFunction.apply(x, weight, self.eps)
