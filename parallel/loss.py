"""Vocab-parallel cross-entropy (Megatron-LM): each tp rank holds logits for a slice of the
vocabulary, and the full [tokens, vocab] logits are never gathered on one rank.

Forward: each rank finds, per token, the max and the sum of exponentials of its slice and the
target's logit when the target is in its slice; three all-reduces of one number per token
combine them into log-sum-exp. Backward: softmax minus one-hot, recomputed from the saved logits
and log-sum-exp. Padded vocabulary columns (beyond the logical vocabulary) never enter the sum
and never receive a gradient.

The work runs over chunks of tokens, in fp32 whatever the logits' dtype, so no fp32 copy of the
whole [tokens, vocab] tensor is ever made: the logits (2 bytes per entry in bf16) are all that
is kept for backward, where Megatron-LM and `F.cross_entropy` keep a full fp32 softmax or
log-softmax (4 bytes) and allocate several more. Passing `inplace_backward=True` writes the
gradient into the logits' own storage (Megatron does the same): the model does, because nobody
else holds its logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import comm

# Entries per chunk: a few MB in fp32 stays in cache on a CPU; a GPU wants fewer, larger launches.
CHUNK_ENTRIES = {"cpu": 1 << 20}
DEFAULT_CHUNK_ENTRIES = 1 << 26


def _row_chunks(logits: torch.Tensor):
    rows = max(1, CHUNK_ENTRIES.get(logits.device.type, DEFAULT_CHUNK_ENTRIES) // max(1, logits.shape[1]))
    return [(r, min(r + rows, logits.shape[0])) for r in range(0, logits.shape[0], rows)]


def _fp32(logits, buffer):
    """The chunk itself when it is fp32 (then the next op writes the buffer: one pass fewer),
    else its fp32 copy in the buffer (torch's reductions and sub have no mixed-dtype out=)."""
    return logits if logits.dtype == buffer.dtype else buffer.copy_(logits)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size, ignore_index, inplace_backward):
        n, local_vocab = logits.shape
        valid = min(max(vocab_size - vocab_start, 0), local_vocab)  # this slice's non-padding columns
        local_max = torch.full((n,), float("-inf"), device=logits.device)
        sum_exp = torch.zeros(n, device=logits.device)
        if valid and n:
            chunks = _row_chunks(logits)
            work = torch.empty(chunks[0][1], valid, device=logits.device)  # one fp32 buffer, reused
            for lo, hi in chunks:
                chunk = _fp32(logits[lo:hi, :valid], work[: hi - lo])
                torch.amax(chunk, dim=-1, out=local_max[lo:hi])
                shifted = torch.sub(chunk, local_max[lo:hi, None], out=work[: hi - lo])
                torch.sum(shifted.exp_(), dim=-1, out=sum_exp[lo:hi])
        global_max = local_max.clone()
        comm.all_reduce(global_max, group, op=dist.ReduceOp.MAX, name="loss_all_reduce")
        sum_exp.mul_((local_max - global_max).exp_())  # rescale to the global max (a slice of padding: 0)
        comm.all_reduce(sum_exp, group, name="loss_all_reduce")

        local_target = target - vocab_start
        outside = (local_target < 0) | (local_target >= valid)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).float().masked_fill(outside, 0.0)
        comm.all_reduce(target_logit, group, name="loss_all_reduce")

        log_sum_exp = sum_exp.log_().add_(global_max)
        ignored = target == ignore_index
        loss = (log_sum_exp - target_logit).masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, log_sum_exp, local_target, outside | ignored, ignored)
        ctx.valid, ctx.inplace_backward, ctx.used = valid, inplace_backward, False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used and ctx.inplace_backward:
            raise RuntimeError("vocab_parallel_cross_entropy(inplace_backward=True) wrote its gradient over its "
                               "logits: its backward can run only once (no retain_graph)")
        ctx.used = True
        logits, log_sum_exp, local_target, not_here, ignored = ctx.saved_tensors
        grad = logits if ctx.inplace_backward else torch.empty_like(logits)
        if not logits.numel():
            return grad, None, None, None, None, None, None
        scale = grad_loss.masked_fill(ignored, 0.0)
        hit = (~not_here).float()
        chunks = _row_chunks(logits)
        work = torch.empty(chunks[0][1], logits.shape[1], device=logits.device)  # one fp32 buffer, reused
        rows = torch.arange(chunks[0][1], device=logits.device)
        for lo, hi in chunks:
            chunk = _fp32(logits[lo:hi], work[: hi - lo])
            softmax = torch.sub(chunk, log_sum_exp[lo:hi, None], out=work[: hi - lo]).exp_()
            softmax[:, ctx.valid:] = 0.0
            softmax[rows[: hi - lo], local_target[lo:hi]] -= hit[lo:hi]
            grad[lo:hi] = softmax.mul_(scale[lo:hi, None])
        return grad, None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, group=None, vocab_start=0, vocab_size=None,
                                 ignore_index=-100, reduction="mean", inplace_backward=False):
    """Cross-entropy of local logits [..., V/tp] against global target ids [...].

    `vocab_start` is this rank's first vocabulary id, `vocab_size` the logical vocabulary (the
    columns at or beyond it are padding). `reduction`: "mean" over non-ignored tokens, "sum", "none".
    `inplace_backward`: backward overwrites `logits` with their gradient (see the module docstring).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_target = target.reshape(-1)
    vocab_size = vocab_size if vocab_size is not None else comm.group_size(group) * logits.shape[-1]
    loss = _VocabParallelCrossEntropy.apply(flat_logits, flat_target, group, vocab_start, vocab_size,
                                            ignore_index, inplace_backward)
    if reduction == "none":
        return loss.view(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (flat_target != ignore_index).sum().clamp(min=1)
