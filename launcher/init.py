"""One initialisation for every command: the process group, the device, then the topology."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from launcher.env import LaunchEnv, detect
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
        if env.master_addr is None or env.master_port is None:
            raise RuntimeError(f"rank {env.rank} of {env.world_size} has no rendezvous: set MASTER_ADDR and "
                               "MASTER_PORT")
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return build_topology(tp, pp, dp)
