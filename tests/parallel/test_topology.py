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


def _wait_for_a_silent_peer(timeout_s: float) -> dict:
    """Rank 1 stays away from a tp all-reduce and then from a pp receive; rank 0 measures how
    long each waits before raising (the world group's timeout is 30 s in these pools)."""
    import time

    import torch

    from parallel import comm
    waited = {}
    layouts = {"tp": build_topology(tp=2, timeout_s=timeout_s), "pp": build_topology(pp=2, timeout_s=timeout_s)}
    for name, topo in layouts.items():
        if topo.rank == 1:
            time.sleep(3 * timeout_s)  # silent, as a SIGSTOPped peer
            continue
        start = time.perf_counter()
        try:
            if name == "tp":
                comm.all_reduce(torch.ones(4), topo.tp_group)
            else:
                op = dist.P2POp(dist.irecv, torch.empty(4), 1, topo.pp_group, 7)
                for work in dist.batch_isend_irecv([op]):
                    work.wait()
        except RuntimeError:
            waited[name] = time.perf_counter() - start
    return waited


@pytest.mark.timeout(120)
def test_every_group_has_the_timeout_so_a_silent_peer_cannot_hang_a_rank():
    """`new_group` does not inherit the world's timeout: without one passed, a tp collective or
    a pp receive waits for a stopped peer for as long as it stays stopped."""
    waited = run_on_ranks(_wait_for_a_silent_peer, 2, 2.0, timeout=60)[0]
    assert set(waited) == {"tp", "pp"} and all(1.5 < s < 6 for s in waited.values()), waited


def test_tp_groups_crossing_nodes():
    from parallel.topology import node_crossing_message, tp_groups_crossing_nodes
    assert tp_groups_crossing_nodes(8, 2048, 8) == []
    assert tp_groups_crossing_nodes(8, 32, 16) == []
    every = tp_groups_crossing_nodes(8, 32, 4)  # tp larger than a node: every group spans two
    assert every == [list(range(s, s + 8)) for s in (0, 8, 16, 24)]
    assert tp_groups_crossing_nodes(4, 24, 6) == [[4, 5, 6, 7], [16, 17, 18, 19]]  # 6 not a multiple of 4
    line = node_crossing_message(tp_groups_crossing_nodes(4, 24, 6), 4, 6)
    assert line.startswith("2 tp groups span nodes at 6 ranks per node (ranks 4-7 on nodes 0-1; ranks 16-19 on "
                           "nodes 2-3)"), line
    assert line.endswith("choose tp in [1, 2, 3, 6]") and "\n" not in line
