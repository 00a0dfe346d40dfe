"""RMSNorm (Zhang & Sennrich 2019), sequence-parallel aware.

Under sequence parallelism every tp rank normalises a different slice of the sequence, so the
weight's gradient is only a partial sum: the weight enters through copy_to_tp, whose backward
all-reduces that gradient across tp. Without sp every rank sees the same input and gradient.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from parallel.layers import NO_TP, TensorParallel
from parallel.mappings import copy_to_tp
from parallel.params import make_param


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, tp: TensorParallel = NO_TP, device=None, dtype=None):
        super().__init__()
        self.dim, self.eps, self.tp = dim, eps, tp
        self.weight = make_param((dim,), (dim,), None, tp.rank, tp.size, None, device, dtype)

    def forward(self, x):
        weight = copy_to_tp(self.weight, self.tp.group) if self.tp.sp else self.weight
        # Normalise in fp32 and scale in the activation dtype, as Meta's and HF's code do.
        return F.rms_norm(x.float(), (self.dim,), eps=self.eps).type_as(x) * weight
