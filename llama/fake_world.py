"""A whole job's process group inside one CPU process: torch's fake backend at full world size.

The dry run (`llama-train --dry-run`) and the planner build rank R's set-up of an N-rank job
(the topology's groups, the model chunks on the meta device, the gradient buckets, the optimizer
state) without N processes: every collective on the fake group returns at once and computes
nothing, so it serves for set-up and shapes, never for values.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist


@contextmanager
def fake_world(world_size: int, rank: int):
    """Be rank `rank` of a `world_size`-rank job for the duration of the block."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    if dist.is_initialized():
        raise RuntimeError("fake_world: a process group is already initialised in this process")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} ranks (0..{world_size - 1})")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        from parallel.comm import forget_subgroups
        forget_subgroups()
        dist.destroy_process_group()
