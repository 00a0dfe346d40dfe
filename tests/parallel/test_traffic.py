"""Bytes moved by one transformer layer's forward + backward under tp and tp + sp, against the
formula of llama-paper-facts.md (Korthikanti et al. 2022): two all-reduces of b·s·h forward and
two backward; under sp each all-reduce becomes a reduce-scatter plus an all-gather of the same
volume, plus the two re-gathers of the column layers' inputs in backward (the price of not
keeping the gathered input) and the norm-weight gradient all-reduces (2·h)."""
import pytest
import torch

from llama.attention import rope_tables
from llama.config import LlamaConfig
from llama.model import TransformerBlock
from parallel import comm
from parallel.layers import TensorParallel
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology

B, S, H = 2, 8, 32


def expected_bytes(b, s, h, sp, elt=4):
    bsh = b * s * h * elt
    if not sp:
        return {"all_reduce": 4 * bsh}
    return {"reduce_scatter": 4 * bsh, "all_gather": 4 * bsh + 2 * bsh, "all_reduce": 2 * h * elt}


def _layer_traffic(tp_size, sp):
    cfg = LlamaConfig(dim=H, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=S)
    tp = TensorParallel(topology(tp=tp_size).tp_group, sp=sp)
    block = TransformerBlock(cfg, tp=tp)
    init_parameters(block, 0)
    cos, sin = rope_tables(cfg.head_dim, S, cfg.rope_theta)
    x = torch.randn(B, S // tp_size if sp else S, H, requires_grad=True)
    comm.reset_traffic()
    block(x, cos, sin).sum().backward()
    return dict(comm.TRAFFIC)


@pytest.mark.parametrize("sp", [False, True])
def test_one_layer_moves_what_the_formula_says(sp):
    measured = run_on_ranks(_layer_traffic, 2, 2, sp)[0]
    assert measured == expected_bytes(B, S, H, sp)


PP_CFG = dict(dim=H, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=S)


def _pipeline_traffic(m):
    from llama.parallelize import activation_shape, build_chunks
    from parallel.pipeline.p2p import PipelineP2P
    from parallel.pipeline.schedules import run_schedule
    cfg = LlamaConfig(**PP_CFG)
    topo = topology(pp=2)
    chunks = build_chunks(cfg, topo, seed=0, attention="sdpa")
    micro = [(t[:, :-1], t[:, 1:]) for t in torch.randint(0, 64, (m, B, S + 1))]
    comm.reset_traffic()
    run_schedule("1f1b", chunks, micro, PipelineP2P(topo), 2, topo.pp_rank,
                 activation_shape(cfg, B, S, 1, False), torch.float32)
    return dict(comm.TRAFFIC)


def test_pipeline_moves_one_activation_and_one_gradient_per_micro_batch():
    m = 3
    sent = run_on_ranks(_pipeline_traffic, 2, m)
    assert sent[0] == {"p2p": m * B * S * H * 4}  # stage 0 sends activations forward
    assert sent[1] == {"p2p": m * B * S * H * 4}  # stage 1 sends their gradients back


def _data_parallel_traffic(distributed):
    from llama.model import Transformer
    from parallel.data_parallel import GradBuckets
    from parallel.optimizer import Optimizer
    cfg = LlamaConfig(**PP_CFG)
    topo = topology(tp=1, pp=1)  # dp = 2
    model = Transformer(cfg, attention="sdpa")
    init_parameters(model, 0)
    buckets = GradBuckets(list(model.parameters()), topo.dp_group, bucket_mb=0.01, reduce_scatter=distributed)
    opt = Optimizer(buckets, topo, 1e-3, distributed=distributed)
    buckets.start_step(1)
    tokens = torch.randint(0, 64, (B, S + 1))
    comm.reset_traffic()
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    opt.step(1e-3)
    padded = sum(b.numel for b in buckets.buckets)
    n_params = sum(p.numel() for p in model.parameters())
    return dict(comm.TRAFFIC), padded, n_params


def expected_dp_bytes(padded_numel, distributed, elt=4):
    if distributed:  # ZeRO-1: reduce-scatter the gradients, all-gather the parameters
        return {"reduce_scatter": padded_numel * elt, "all_gather": padded_numel * elt}
    return {"all_reduce": padded_numel * elt}


@pytest.mark.parametrize("distributed", [False, True])
def test_data_parallel_moves_the_gradients_once(distributed):
    traffic, padded, n_params = run_on_ranks(_data_parallel_traffic, 2, distributed)[0]
    assert padded - n_params < 2 * 16  # padding to a multiple of dp per bucket, no more
    norm = {k: v for k, v in traffic.items() if k == "norm_all_reduce"}
    assert {k: v for k, v in traffic.items() if k not in norm} == expected_dp_bytes(padded, distributed)
