"""Layout arithmetic and process groups: tp fastest, then dp, then pp."""
import pytest
import torch.distributed as dist

from parallel.topology import Topology, TopologyError, build_topology, check_layout
from tests.distributed import run_on_ranks, topology


def test_dp_is_inferred_and_bad_layouts_fail_with_the_rule():
    assert check_layout(8, 2, 2, None) == 2
    with pytest.raises(TopologyError, match=r"tp\*pp\*dp=2\*2\*3=12 does not equal world size 8"):
        check_layout(8, 2, 2, 3)
    with pytest.raises(TopologyError, match=r"world size 6 is not divisible by tp\*pp=4\*1"):
        check_layout(6, 4, 1, None)
    with pytest.raises(TopologyError, match="tp=0 must be a positive integer"):
        check_layout(4, 0, 1, None)


def test_world_of_one_needs_no_process_group():
    assert not dist.is_initialized()
    topo = build_topology()
    assert (topo.tp, topo.pp, topo.dp, topo.tp_group, topo.is_first_stage, topo.is_last_stage) == \
        (1, 1, 1, None, True, True)


def test_coordinates_follow_tp_fastest_then_dp_then_pp():
    topo = Topology(tp=2, pp=2, dp=2, rank=5)
    assert (topo.tp_rank, topo.dp_rank, topo.pp_rank) == (1, 0, 1)
    assert topo.rank_of(1, 0, 1) == 5


def _groups(tp, pp):
    topo = topology(tp=tp, pp=pp)
    members = {name: (dist.get_process_group_ranks(g) if g is not None else [dist.get_rank()])
               for name, g in (("tp", topo.tp_group), ("dp", topo.dp_group), ("pp", topo.pp_group),
                               ("mp", topo.mp_group))}
    return topo.rank, topo.tp_rank, topo.dp_rank, topo.pp_rank, members, topo.prev_rank, topo.next_rank


def test_groups_on_eight_ranks():
    out = run_on_ranks(_groups, 8, 2, 2)  # tp=2, pp=2, dp=2
    rank, tp_rank, dp_rank, pp_rank, members, prev, nxt = out[5]
    assert (tp_rank, dp_rank, pp_rank) == (1, 0, 1)
    assert members == {"tp": [4, 5], "dp": [5, 7], "pp": [1, 5], "mp": [0, 1, 4, 5]}
    assert (prev, nxt) == (1, None)
    assert out[1][5:] == (None, 5)
    # every rank sits in exactly one group of each kind, and those groups partition the world
    for kind, size in (("tp", 2), ("dp", 2), ("pp", 2), ("mp", 4)):
        groups = {tuple(o[4][kind]) for o in out}
        assert sorted(r for g in groups for r in g) == list(range(8)) and all(len(g) == size for g in groups)
