"""Vocab-parallel cross-entropy (Megatron-LM): each tp rank holds logits for a slice of the
vocabulary, and the full [tokens, vocab] logits are never gathered on one rank.

Forward: the max, the target's logit and the sum of exponentials are all-reduced across tp
(three all-reduces of one number per token). Backward: softmax minus one-hot, locally.
Padded vocabulary columns (beyond the logical vocabulary) are set to -inf: they never win the
softmax and never receive a gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel import comm


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size, ignore_index):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        valid_cols = vocab_size - vocab_start  # columns of this shard inside the logical vocabulary
        if valid_cols < local_vocab:
            logits = logits.clone()
            logits[:, max(valid_cols, 0):] = float("-inf")
        logits_max = logits.max(dim=-1).values
        comm.all_reduce(logits_max, group, op=dist.ReduceOp.MAX, name="loss_all_reduce")
        shifted = logits - logits_max.unsqueeze(-1)

        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= local_vocab)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        comm.all_reduce(target_logit, group, name="loss_all_reduce")

        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp, group, name="loss_all_reduce")
        loss = sum_exp.log() - target_logit
        ignored = target == ignore_index
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside | ignored, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, not_here, ignored = ctx.saved_tensors
        grad = softmax  # reused in place: backward runs once
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= (~not_here).to(grad.dtype)
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, group=None, vocab_start=0, vocab_size=None,
                                 ignore_index=-100, reduction="mean"):
    """Cross-entropy of local logits [..., V/tp] against global target ids [...].

    `vocab_start` is this rank's first vocabulary id, `vocab_size` the logical vocabulary (the
    columns at or beyond it are padding). `reduction`: "mean" over non-ignored tokens, "sum", "none".
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_target = target.reshape(-1)
    vocab_size = vocab_size if vocab_size is not None else comm.group_size(group) * logits.shape[-1]
    if comm.group_size(group) == 1 and logits.shape[-1] == vocab_size:
        loss = F.cross_entropy(flat_logits.float(), flat_target, ignore_index=ignore_index, reduction="none")
    else:
        loss = _VocabParallelCrossEntropy.apply(flat_logits, flat_target, group, vocab_start, vocab_size,
                                                ignore_index)
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (flat_target != ignore_index).sum().clamp(min=1)
