"""The optimizer's global gradient norm against the formula on the logical tensors.

Every parameter gets a known logical gradient (a function of its name); each rank puts its
shard of it into the gradient buckets. Over tp, pp and dp, with and without the distributed
optimizer, the norm must be that of the logical gradients, each logical parameter counted once:
a tensor replicated across tp (an RMSNorm gain) on one tp rank only, the dp replicas once, the
padded vocabulary rows not at all.
"""
import math
import zlib

import pytest
import torch

from llama.config import LlamaConfig
from llama.model import Transformer
from llama.parallelize import build_chunks
from parallel.data_parallel import GradBuckets
from parallel.optimizer import Optimizer
from parallel.params import shard_of
from tests.distributed import run_on_ranks, topology

# vocab 250, padded to 256 on every layout (vocab_pad_multiple=8 below)
CFG = LlamaConfig(dim=32, n_layers=4, n_heads=4, vocab_size=250, multiple_of=16, max_seq_len=16)


def logical_gradient(name: str, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))


def _norm_on_ranks(tp, pp, distributed):
    topo = topology(tp=tp, pp=pp)
    chunks = build_chunks(CFG, topo, sp=tp > 1, seed=0, attention="sdpa", vocab_pad_multiple=8)
    buckets = GradBuckets([p for c in chunks for p in c.parameters()], topo.dp_group, bucket_mb=0.01,
                          reduce_scatter=distributed, tp_group=topo.tp_group)
    optimizer = Optimizer(buckets, topo, 1e-3, distributed=distributed)
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.main_grad.copy_(shard_of(logical_gradient(name, p.logical_shape), p))
    # what buckets.finish() hands the optimiser: per bucket, the whole gradient or this rank's shard
    return optimizer.global_grad_norm([b.grad[lo:hi] for b, (lo, hi) in zip(buckets.buckets, optimizer.ranges)])


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1), (1, 4)])  # on 8 ranks: dp = 2
def test_the_global_gradient_norm_counts_each_logical_parameter_once(tp, pp):
    reference = Transformer(CFG, attention="sdpa")
    want = math.sqrt(sum(logical_gradient(name, p.shape).double().square().sum().item()
                         for name, p in reference.named_parameters()))
    for distributed in (False, True):
        norms = run_on_ranks(_norm_on_ranks, 8, tp, pp, distributed)
        for rank, got in enumerate(norms):
            assert abs(got - want) <= 1e-6 * want, \
                f"tp={tp} pp={pp} dp=2 distributed={distributed}: rank {rank} norm {got}, logical {want}"
