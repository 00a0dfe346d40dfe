"""Each communication pattern and its conjugate backward, on 2 ranks, against values worked
out by hand: rank r holds x_r = (r + 1) · ones, and the upstream gradient is (r + 1) · ones."""
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
    for r, (y, grad) in enumerate(out):
        split_dim = -1 if name.endswith("_tp") else 1
        if fwd(r) is not None:
            want = torch.full((2, 4, 6), float(fwd(r)))
            want = want.chunk(2, split_dim)[r] if name.startswith(("scatter", "reduce_scatter")) else want
            assert torch.equal(y, want), name
        else:  # a gather: rank 0's block then rank 1's block
            assert torch.equal(y, torch.cat([torch.full((2, 4, 6), 1.0), torch.full((2, 4, 6), 2.0)], split_dim))
        if bwd(r) is not None:
            assert torch.equal(grad, torch.full((2, 4, 6), float(bwd(r)))), name
        else:  # the conjugate of a split: the gathered gradient, rank r's own block being r + 1
            assert torch.equal(grad.chunk(2, split_dim)[0], torch.full_like(grad.chunk(2, split_dim)[0], 1.0))
            assert torch.equal(grad.chunk(2, split_dim)[1], torch.full_like(grad.chunk(2, split_dim)[1], 2.0))


def _counted():
    group = topology(tp=2).tp_group
    comm.reset_traffic()
    x = torch.ones(3, 4, 8)
    comm.all_reduce(x, group)
    comm.all_gather(x, group, dim=1)
    comm.reduce_scatter(x, group, dim=1)
    return dict(comm.TRAFFIC), dict(comm.CALLS)


def test_every_collective_records_its_bytes():
    traffic, calls = run_on_ranks(_counted, 2)[0]
    assert traffic == {"all_reduce": 384, "all_gather": 768, "reduce_scatter": 384}
    assert calls == {"all_reduce": 1, "all_gather": 1, "reduce_scatter": 1}
    assert comm.wire_bytes("all_reduce", 384, 2) == 384 and comm.wire_bytes("all_gather", 768, 4) == 576
