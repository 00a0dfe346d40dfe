"""The multi-process helper itself: results by rank, a failing rank reported, a hang caught."""
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_on_ranks


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _rank_two_raises():
    if dist.get_rank() == 2:
        raise RuntimeError("rank two is broken")
    return dist.get_rank()


def _rank_zero_sleeps():
    if dist.get_rank() == 0:
        time.sleep(30)
    return dist.get_rank()


def test_results_come_back_in_rank_order():
    assert run_on_ranks(_sum_of_ranks, 4) == [(r, 6.0) for r in range(4)]


def test_a_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(AssertionError, match="rank 2 ---(.|\n)*rank two is broken"):
        run_on_ranks(_rank_two_raises, 4)
    assert run_on_ranks(_sum_of_ranks, 4)[3] == (3, 6.0)  # a fresh pool after the failure


def test_a_hang_is_a_failure():
    with pytest.raises(TimeoutError, match="ranks without a result: \\[0\\]"):
        run_on_ranks(_rank_zero_sleeps, 2, timeout=3)
