"""Tensor-parallel layers (Megatron-LM): column- and row-parallel linear, vocab-parallel embedding.

On one process (group None) each is exactly nn.Linear / nn.Embedding without bias. With tp ranks:

    ColumnParallelLinear   W split by output rows; the input enters the tp region through
                           copy_to_tp (or gather_from_sp under sequence parallelism)
    RowParallelLinear      W split by input columns; partial outputs are summed by
                           reduce_from_tp (or reduce_scatter_to_sp under sequence parallelism)
    VocabParallelEmbedding rows split by vocabulary range; a masked lookup, then a sum

Several column layers that read the same input (wq, wk, wv; w1, w3) run through
`column_parallel(x, *layers)`: one all-gather instead of three, and in backward the
input-gradient collective is launched before the weight-gradient GEMMs so they overlap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallel import comm
from parallel.mappings import (
    copy_to_tp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
    sp_all_gather,
    sp_all_gather_start,
    sp_reduce_scatter_start,
)
from parallel.params import make_param
from parallel.topology import divisors


@dataclass(frozen=True)
class TensorParallel:
    """Which tp group the layers shard over, whether activations are sequence-sharded (sp), and
    whether a column layer's backward overlaps its input-gradient collective with the
    weight-gradient GEMM (overlap; off only to measure what it buys).

    keep_gathered (sp only): column layers keep their all-gathered input for backward, as
    torch's tensor parallelism does, instead of keeping the shard and all-gathering it again
    (Korthikanti et al., Megatron-LM): one all-gather fewer per column group in backward, for
    2(t-1)/t · s·b·h more bytes per column group (bf16) without recompute."""
    group: object = None
    sp: bool = False
    overlap: bool = True
    keep_gathered: bool = False

    @property
    def size(self) -> int:
        return comm.group_size(self.group)

    @property
    def rank(self) -> int:
        return comm.group_rank(self.group)


NO_TP = TensorParallel()


def divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tp={tp}; choose tp in {divisors(n, 64)}")
    return n // tp


def padded_size(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W's output rows split across tp; the output stays split unless gathered.

    `replicas` > 1: W is cut into tp/replicas shards, each held by `replicas` consecutive tp
    ranks (the kv heads of grouped-query attention when tp > n_kv_heads). Each copy's gradient
    then covers only its own rank's tokens-to-heads path, so the weight enters the matmul
    through copy_to_tp over the copies, whose backward sums their gradients (Megatron's
    conjugate pair again, on a sub-group of tp); under the gradient buckets, as the trainer
    runs, the buckets sum them instead, once per step (`copies_group` marks the weight)."""

    def __init__(self, in_features, out_features, tp: TensorParallel = NO_TP, gather_output=False,
                 init_std=0.02, padded_out_features=None, device=None, dtype=None, replicas: int = 1):
        super().__init__()
        self.tp, self.gather_output = tp, gather_output
        self.out_features = out_features  # logical; padded_out_features >= it (vocabulary padding)
        local_out = divide(padded_out_features or out_features, divide(tp.size, replicas, "replicas"), "out_features")
        self.weight = make_param((local_out, in_features), (out_features, in_features), 0, tp.rank,
                                 tp.size, init_std, device, dtype, replicas=replicas)
        self.weight.copies_group = comm.block_subgroup(tp.group, replicas) if replicas > 1 else None

    def matmul_weight(self) -> torch.Tensor:
        """The weight as the matmul reads it: through copy_to_tp when tp ranks hold copies of it,
        unless the gradient buckets sum the copies' gradients later (one all-reduce per bucket)."""
        group = getattr(self.weight, "copies_group", None)  # None too for a tied embedding
        if group is None or getattr(self.weight, "grad_summed_by_buckets", False):
            return self.weight
        return copy_to_tp(self.weight, group)

    def forward(self, x):
        (y,) = column_parallel(x, self)
        return y


class RowParallelLinear(nn.Module):
    """y = x Wᵀ with W's input columns split across tp; the partial products are summed."""

    def __init__(self, in_features, out_features, tp: TensorParallel = NO_TP, input_is_parallel=True,
                 init_std=0.02, device=None, dtype=None):
        super().__init__()
        self.tp, self.input_is_parallel = tp, input_is_parallel
        local_in = divide(in_features, tp.size, "in_features")
        self.weight = make_param((out_features, local_in), (out_features, in_features), 1, tp.rank,
                                 tp.size, init_std, device, dtype)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp.group)
        (y,) = _ParallelMatmuls.apply(x, NO_TP, self.weight)
        return reduce_scatter_to_sp(y, self.tp.group) if self.tp.sp else reduce_from_tp(y, self.tp.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; ids outside this rank's range look up zeros."""

    def __init__(self, num_embeddings, dim, tp: TensorParallel = NO_TP, pad_to_multiple_of=1,
                 init_std=0.02, device=None, dtype=None):
        super().__init__()
        self.tp, self.num_embeddings = tp, num_embeddings
        padded = padded_size(num_embeddings, pad_to_multiple_of * tp.size)
        self.local_rows = padded // tp.size
        self.vocab_start = tp.rank * self.local_rows
        self.weight = make_param((self.local_rows, dim), (num_embeddings, dim), 0, tp.rank, tp.size,
                                 init_std, device, dtype)

    def forward(self, ids):
        if self.tp.size == 1:
            return _Lookup.apply(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_rows)
        out = _Lookup.apply(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sp(out, self.tp.group) if self.tp.sp else reduce_from_tp(out, self.tp.group)


class _Lookup(torch.autograd.Function):
    """F.embedding, whose backward adds the gradient rows straight into the weight's gradient
    bucket (`main_grad_sink`, in the bucket's fp32 whatever the weight's dtype): no [vocab, dim]
    zero-filled gradient is allocated and then copied into the bucket."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        sink = getattr(weight, "main_grad_sink", None)
        if sink is None:  # what F.embedding's own backward computes
            return None, torch.ops.aten.embedding_dense_backward(grad, ids, weight.shape[0], -1, False)
        sink.add_rows(weight, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return None, None


class _ParallelMatmuls(torch.autograd.Function):
    """y_i = x_total W_iᵀ for several weights sharing one input; x_total is x gathered over the
    sequence under sp (gather_from_sp), else x itself (copy_to_tp). With `NO_TP` it is a plain
    matmul (how the row-parallel layer and one process use it).

    Backward, with overlap (paper section 2.4, item 4; Megatron-LM's async grad all-reduce):
    under sp the input is re-gathered (it was not kept: Korthikanti et al.) while the
    input-gradient GEMM computes; then the input-gradient reduce-scatter (all-reduce without
    sp) is in flight while the weight-gradient GEMMs compute. A weight whose gradient bucket has
    its dtype (`main_grad_sink`, set by `parallel.data_parallel`) gets its gradient GEMM written
    straight into the bucket: Megatron-LM's gradient-accumulation fusion, which saves a
    gradient-sized allocation and a copy per weight.
    """

    @staticmethod
    def forward(ctx, x, tp, *weights):
        ctx.tp = tp
        x_total = sp_all_gather(x, tp.group) if tp.sp else x
        ctx.save_for_backward(x_total if tp.keep_gathered else x, *weights)
        return tuple(F.linear(x_total, w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        x, *saved_weights = ctx.saved_tensors  # unpacked once: checkpointing allows no second time
        tp = ctx.tp
        regather = tp.sp and not tp.keep_gathered
        gathered = sp_all_gather_start(x, tp.group) if regather else (lambda: x)
        if not tp.overlap:
            gathered = _completed(gathered)
        # Under autocast the forward ran in the autocast dtype and so do the gradients: the
        # saved input and weights are cast to it (what autocast's own backward does).
        weights = [w.to(grads[0].dtype) for w in saved_weights]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_total = grads[0].matmul(weights[0])
            flat_total = grad_total.view(-1, grad_total.shape[-1])
            for g, w in zip(grads[1:], weights[1:]):  # summed in place: no temporary per weight
                flat_total.addmm_(g.reshape(-1, g.shape[-1]), w)
            start = sp_reduce_scatter_start if tp.sp else comm.all_reduce_start
            grad_x = start(grad_total, tp.group)
            if not tp.overlap:
                grad_x = _completed(grad_x)
        x_total = gathered()
        flat_x = x_total.reshape(-1, x_total.shape[-1])
        grad_ws = [_weight_grad(w, g.reshape(-1, g.shape[-1]), flat_x) if needed else None
                   for w, g, needed in zip(saved_weights, grads, ctx.needs_input_grad[2:])]
        return (grad_x().to(x.dtype) if grad_x else None, None, *grad_ws)


def _weight_grad(weight, flat_grad, flat_x):
    """gradᵀ x, or None once it has been accumulated into the weight's gradient bucket."""
    sink = getattr(weight, "main_grad_sink", None)
    if sink is None or flat_grad.dtype != weight.main_grad.dtype:  # a GEMM has no mixed-dtype out=
        return flat_grad.t().matmul(flat_x.to(flat_grad.dtype)).to(weight.dtype)
    sink.add_matmul(weight, flat_grad, flat_x)
    return None


def _completed(finish):
    """Wait for a started collective now (overlap off); returns a `finish` that just hands it over."""
    result = finish()
    return lambda: result


def column_parallel(x, *layers: ColumnParallelLinear):
    """Run column-parallel layers that share the input `x`; returns one output per layer."""
    tp = layers[0].tp
    outs = _ParallelMatmuls.apply(x, tp, *(layer.matmul_weight() for layer in layers))
    return tuple(gather_from_tp(y, tp.group) if layer.gather_output else y for y, layer in zip(outs, layers))

