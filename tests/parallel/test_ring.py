"""The ring collectives of `parallel.ring` against sums worked out on one process, on 2, 3 and
4 gloo ranks: rank r holds x_r = arange · (r + 1) + r, so every rank's part is different."""
import pytest
import torch

from parallel import ring
from tests.distributed import run_on_ranks, topology


def _x(rank: int, shape) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) * (rank + 1) + rank


def _collectives(n: int):
    group = topology(tp=n).tp_group
    r = torch.distributed.get_rank(group)
    x = _x(r, (n * 3, 5))
    before = x.clone()
    scattered = ring.reduce_scatter_start(x, group)()
    untouched = torch.equal(x, before)
    gathered = ring.all_gather_start(_x(r, (2, 5)), group)()
    odd = _x(r, (7,))  # 7 elements: chunks of unequal size for n = 2, 3, 4
    ring.all_reduce_start(odd, group)()
    return scattered, untouched, gathered, odd


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ring_collectives_equal_sums_on_one_process(n):
    total = sum(_x(r, (n * 3, 5)) for r in range(n))
    for r, (scattered, untouched, gathered, odd) in enumerate(run_on_ranks(_collectives, n, n)):
        assert torch.equal(scattered, total[3 * r: 3 * (r + 1)])
        assert untouched  # the reduce-scatter's input is left as it was
        assert torch.equal(gathered, torch.cat([_x(q, (2, 5)) for q in range(n)]))
        assert torch.equal(odd, sum(_x(q, (7,)) for q in range(n)))
