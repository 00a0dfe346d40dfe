"""One initialisation for every command: the process group, the device, then the topology.

backend: nccl with CUDA, gloo on CPU (overridable); the CUDA device from the local rank; a
timeout, on every process group, after which a collective waiting for a dead or stuck peer raises
(`launcher.faults` then names the rank that failed).
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from launcher.env import LaunchEnv, detect
from launcher.rendezvous import rendezvous
from parallel.topology import Topology, build_topology, check_layout


def initialize(tp: int = 1, pp: int = 1, dp: int | None = None, backend: str | None = None,
               timeout_s: float = 600.0, env: LaunchEnv | None = None) -> Topology:
    """Join the job and build the layout's groups. The layout is checked against the world size
    first, so a bad layout fails with one line on every rank before any collective."""
    env = env or detect()
    check_layout(env.world_size, tp, pp, dp)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if env.world_size > 1 and not dist.is_initialized():
        addr, port = rendezvous(env, os.environ.get("SLURM_STEP_ID"))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=env.rank,
                                world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return build_topology(tp, pp, dp, timeout_s=timeout_s)
