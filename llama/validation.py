"""Validation during training: the loss on held-out data every `train.eval_every` steps and
after the last one.

The held-out data are the first `eval_iters` × `global_batch` windows of a token shard, read in
order (window i is tokens [i·seq_len, (i+1)·seq_len + 1), the windows `llama-eval --perplexity`
reads), so every validation sees the same batches and its numbers compare across steps and
layouts. Each batch is cut like a training batch (a contiguous slice per dp rank, micro-batches)
and runs forward only through the pipeline stages, without autograd; the loss is the mean over
micro-batches and dp ranks, as the training loss is. It reads nothing the training reads: not
its data stream, not the optimizer's state; the model draws no random numbers.
"""
from __future__ import annotations

import numpy as np
import torch

from llama.data import rank_slice
from llama.setup import DTYPES
from llama.shards import Shard, ShardError
from parallel.pipeline.schedules import run_schedule


class EvalData:
    """The held-out windows of one shard, addressed like the training stream (`samples`)."""

    def __init__(self, path: str, seq_len: int, global_batch: int, iters: int, vocab_size: int):
        self.shard = Shard(path)
        if self.shard.loss_mask is not None:  # its windows would score prompts and cross examples
            raise ShardError(f"eval data {path!r} is a fine-tuning shard (it has a .mask): validation reads windows "
                             "of text; give a held-out text shard")
        self.shard.check_vocab(vocab_size)
        self.seq_len, self.global_batch, self.iters = seq_len, global_batch, iters
        need = iters * global_batch * seq_len + 1
        if self.shard.n_tokens < need:
            raise ShardError(f"eval data {path!r} has {self.shard.n_tokens} tokens, too few for eval_iters={iters} "
                             f"batches of global_batch={global_batch} windows of seq_len+1={seq_len + 1} tokens "
                             f"({need} needed)")

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Windows [start, start + count) as a [count, seq_len + 1] tensor."""
        s = self.seq_len
        tokens = np.asarray(self.shard.tokens[start * s:(start + count) * s + 1], dtype=np.int64)
        return torch.from_numpy(tokens).unfold(0, s + 1, s).contiguous()


def open_eval_data(run) -> EvalData | None:
    """The run's held-out data (one-line errors: a missing, foreign or too short shard), or None."""
    t = run.train
    if not t.eval_data:
        return None
    return EvalData(t.eval_data, t.seq_len, t.global_batch, t.eval_iters, run.model.vocab_size)


def due(train_cfg, step: int) -> bool:
    """Whether to validate after `step` (0-based): every eval_every steps, and after the last."""
    done = step + 1
    return done == train_cfg.steps or (train_cfg.eval_every > 0 and done % train_cfg.eval_every == 0)


@torch.no_grad()
def validation_losses(data: EvalData, rs, topo, train_cfg, device) -> list[float]:
    """This rank's per-micro-batch losses over the held-out batches (a last pipeline stage's;
    empty elsewhere): reduce them like the training loss."""
    t = train_cfg
    rs.optimizer.wait_params()  # the distributed optimizer's parameter gathers may still be in flight
    losses = []
    for k in range(data.iters):
        mine = rank_slice(data, k * t.global_batch, t.global_batch, topo.dp, topo.dp_rank).to(device)
        micro = [(mb[:, :-1], mb[:, 1:]) for mb in mine.split(t.micro_batch)]
        stats = run_schedule(t.schedule, rs.chunks, micro, rs.p2p, topo.pp, topo.pp_rank, rs.shape, DTYPES[t.dtype],
                             forward_only=True)
        losses += stats.losses
    return losses
