"""The 3D layout: world = tp × pp × dp, every process group built once.

Rank order is tp fastest, then dp, then pp (Megatron's): tensor-parallel peers are neighbours
(same node, fastest links), pipeline stages are furthest apart. Every rank creates every group
in the same order, as torch.distributed requires. A group of one rank is `None`: the helpers in
`parallel.comm` treat it as "no communication", so world size 1 needs no process group at all.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch.distributed as dist


class TopologyError(ValueError):
    """The requested layout does not fit the world; raised before any collective."""


def divisors(n: int, limit: int | None = None) -> list[int]:
    """The sizes that split n evenly (up to `limit`): what an error suggests instead."""
    return [d for d in range(1, min(n, limit or n) + 1) if n % d == 0]


def check_layout(world: int, tp: int, pp: int, dp: int | None) -> int:
    """Return dp (inferred when None); raise TopologyError with the rule otherwise."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise TopologyError(f"{name}={value!r} must be a positive integer")
    if dp is None:
        if world % (tp * pp):
            raise TopologyError(f"world size {world} is not divisible by tp*pp={tp}*{pp}; "
                                f"choose tp*pp in {divisors(world)}")
        dp = world // (tp * pp)
    if tp * pp * dp != world:
        raise TopologyError(f"tp*pp*dp={tp}*{pp}*{dp}={tp * pp * dp} does not equal world size {world}")
    return dp


@dataclass
class Topology:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    tp_group: object = None
    pp_group: object = None
    dp_group: object = None
    mp_group: object = None          # tp × pp: one model replica (gradient-norm reduction)
    world_group: object = None       # everyone (None on one process)
    pp_ranks: list[int] = field(default_factory=lambda: [0])  # global ranks of my pipeline

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (None on the first)."""
        return None if self.is_first_stage else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last_stage else self.pp_ranks[self.pp_rank + 1]

    def __repr__(self) -> str:
        return (f"Topology(tp={self.tp}, pp={self.pp}, dp={self.dp}, rank={self.rank}: "
                f"tp_rank={self.tp_rank}, dp_rank={self.dp_rank}, pp_rank={self.pp_rank})")


def world_timeout() -> datetime.timedelta | None:
    """The world group's timeout (the store was given it at init), or None when unknown."""
    try:
        return dist.distributed_c10d._get_default_store().timeout
    except Exception:  # a fake or custom store
        return None


def build_topology(tp: int = 1, pp: int = 1, dp: int | None = None, timeout_s: float | None = None) -> Topology:
    """Build every group of the layout. Without an initialised process group: world size 1.

    Every group gets the timeout (`timeout_s`, else the world group's): `new_group` does not
    inherit it, and a collective on a group without one waits as long as a stuck peer stays stuck."""
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else 1
    dp = check_layout(world, tp, pp, dp)
    if world == 1:
        return Topology()
    topo = Topology(tp=tp, pp=pp, dp=dp, rank=dist.get_rank(), world_group=dist.group.WORLD)

    def ranks(tp_r, dp_r, pp_r):
        return [topo.rank_of(t, d, p) for t in tp_r for d in dp_r for p in pp_r]

    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s is not None else world_timeout()

    def make(groups: list[list[int]]):
        mine = None
        for members in groups:  # every rank creates every group, in the same order
            g = dist.new_group(sorted(members), timeout=timeout) if len(members) > 1 else None
            if topo.rank in members:
                mine = g
        return mine

    T, D, P = range(tp), range(dp), range(pp)
    topo.tp_group = make([ranks(T, [d], [p]) for p in P for d in D])
    topo.dp_group = make([ranks([t], D, [p]) for p in P for t in T])
    topo.pp_group = make([ranks([t], [d], P) for d in D for t in T])
    topo.mp_group = make([ranks(T, [d], P) for d in D])
    topo.pp_ranks = [topo.rank_of(topo.tp_rank, topo.dp_rank, p) for p in P]
    return topo


def tp_groups_crossing_nodes(tp: int, world: int, ranks_per_node: int) -> list[list[int]]:
    """The tp groups whose ranks sit on more than one node, when ranks fill nodes in blocks of
    `ranks_per_node` (SLURM's block distribution; tp groups are blocks of tp consecutive ranks).
    None cross when tp divides ranks_per_node (so tp <= ranks_per_node)."""
    groups = [list(range(start, start + tp)) for start in range(0, world - world % tp, tp)]
    return [g for g in groups if g[0] // ranks_per_node != g[-1] // ranks_per_node]


def node_crossing_message(groups: list[list[int]], tp: int, ranks_per_node: int, shown: int = 3) -> str:
    """One line naming the first tp groups that span nodes and the rule they break."""
    named = "; ".join(f"ranks {g[0]}-{g[-1]} on nodes {g[0] // ranks_per_node}-{g[-1] // ranks_per_node}"
                      for g in groups[:shown])
    more = f" and {len(groups) - shown} more" if len(groups) > shown else ""
    return (f"{len(groups)} tp groups span nodes at {ranks_per_node} ranks per node ({named}{more}): their tp "
            f"collectives, several per layer and micro-batch, would cross the inter-node network; tp must "
            f"divide the tasks per node ({ranks_per_node}) and so be at most it; choose tp in "
            f"{divisors(ranks_per_node)}")
