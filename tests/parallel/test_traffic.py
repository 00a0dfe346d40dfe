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
