"""Each communication pattern and its conjugate backward, on 2 ranks, against values worked
out by hand: rank r holds x_r = (r + 1) · ones, and the upstream gradient is (r + 1) · ones.

A tp split is along the last dim. An sp split is of the tokens in memory order: of x [2, 4, 6],
rank r's shard is batch row r, shaped [2, 2, 6], and a gather puts rank r's shard back as row r."""
import pytest
import torch
import torch.distributed as dist

from parallel import comm, mappings
from tests.distributed import run_on_ranks, topology

EXPECT = {  # name: (forward result on rank r, input gradient on rank r), for 2 ranks
    "copy_to_tp": (lambda r: r + 1, lambda r: 3),                      # identity / all-reduce
    "reduce_from_tp": (lambda r: 3, lambda r: r + 1),                  # all-reduce / identity
    "scatter_to_tp": (lambda r: r + 1, lambda r: None),                # split / all-gather
    "gather_from_tp": (lambda r: None, lambda r: r + 1),               # all-gather / split
    "scatter_to_sp": (lambda r: r + 1, lambda r: None),
    "gather_from_sp": (lambda r: None, lambda r: 3),                   # all-gather / reduce-scatter
    "reduce_scatter_to_sp": (lambda r: 3, lambda r: None),             # reduce-scatter / all-gather
}


def _apply(name):
    group = topology(tp=2).tp_group
    r = dist.get_rank()
    x = torch.full((2, 4, 6), float(r + 1), requires_grad=True)
    y = getattr(mappings, name)(x, group)
    y.backward(torch.full_like(y, float(r + 1)))
    return y.detach(), x.grad


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_forward_and_conjugate_backward(name):
    out = run_on_ranks(_apply, 2, name)
    fwd, bwd = EXPECT[name]
    tp = name.endswith("_tp")

    def gather(piece):  # rank 0's block of `piece` shape then rank 1's: along the last dim
        blocks = [torch.full(piece, 1.0), torch.full(piece, 2.0)]  # (tp), as batch rows (sp)
        return torch.cat(blocks, -1) if tp else torch.cat(blocks).view(piece[0], 2 * piece[1], *piece[2:])

    split_shape = (2, 4, 3) if tp else (2, 2, 6)
    for r, (y, grad) in enumerate(out):
        if fwd(r) is not None:
            splits = name.startswith(("scatter", "reduce_scatter"))
            assert torch.equal(y, torch.full(split_shape if splits else (2, 4, 6), float(fwd(r)))), name
        else:
            assert torch.equal(y, gather((2, 4, 6))), name
        if bwd(r) is not None:
            assert torch.equal(grad, torch.full((2, 4, 6), float(bwd(r)))), name
        else:  # the conjugate of a split: the gathered gradient, rank r's own block being r + 1
            assert torch.equal(grad, gather(split_shape)), name


def _sp_round_trip():
    group = topology(tp=2).tp_group
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)  # the same on both ranks
    shard = mappings.scatter_to_sp(x, group)
    return shard, mappings.gather_from_sp(shard, group)


def test_sp_shards_are_the_tokens_in_memory_order():
    for r, (shard, back) in enumerate(run_on_ranks(_sp_round_trip, 2)):
        x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
        assert torch.equal(shard, x[r].view(2, 2, 6))  # batch 2 over 2 ranks: rank r holds row r
        assert torch.equal(back, x)


def _counted():
    group = topology(tp=2).tp_group
    comm.reset_traffic()
    x = torch.ones(3, 4, 8)
    comm.all_reduce(x, group)
    comm.all_gather(x, group, dim=1)
    comm.reduce_scatter(x.view(12, 8), group)
    return dict(comm.TRAFFIC), dict(comm.CALLS)


def test_every_collective_records_its_bytes():
    traffic, calls = run_on_ranks(_counted, 2)[0]
    assert traffic == {"all_reduce": 384, "all_gather": 768, "reduce_scatter": 384}
    assert calls == {"all_reduce": 1, "all_gather": 1, "reduce_scatter": 1}
    assert comm.wire_bytes("all_reduce", 384, 2) == 384 and comm.wire_bytes("all_gather", 768, 4) == 576
