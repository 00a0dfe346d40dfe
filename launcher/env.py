"""Who am I and where is everyone, from the launcher's environment variables.

Order of precedence: torchrun (RANK and WORLD_SIZE) > Open MPI (OMPI_COMM_WORLD_*) > MPICH and
Intel MPI (PMI_RANK, PMI_SIZE) > PMIx (PMIX_RANK) > SLURM (SLURM_PROCID, …) > one process.
MPI comes before SLURM because `mpirun` inside an `sbatch` job leaves every rank with the job
step's SLURM_PROCID=0 (DESIGN.md): the MPI variables are the true ones.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from launcher.hostlist import expand_hostlist


@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "single"
    nodes: tuple[str, ...] = ()      # SLURM's node list, expanded
    job_id: str | None = None


def _int(env, name, default=None):
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {name} is missing")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _tasks_per_node(spec: str, node: int) -> int:
    """SLURM_TASKS_PER_NODE, e.g. '4(x2),3': tasks on node `node`."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r} is not like '4(x2),3'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else counts[-1]


def _rendezvous(env):
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT", 0) or None
    return addr, port


def detect(env=None) -> LaunchEnv:
    env = os.environ if env is None else env
    addr, port = _rendezvous(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        local_world = max(1, _int(env, "LOCAL_WORLD_SIZE", 1))
        rank = _int(env, "RANK")
        return LaunchEnv(rank, _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0), local_world,
                         _int(env, "GROUP_RANK", rank // local_world), addr, port, "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:
        local_world = max(1, _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1))
        rank = _int(env, "OMPI_COMM_WORLD_RANK")
        return LaunchEnv(rank, _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
                         local_world, _int(env, "OMPI_COMM_WORLD_NODE_RANK", rank // local_world), addr, port,
                         "openmpi")
    if "PMI_RANK" in env:  # MPICH (Hydra) and Intel MPI
        local_world = max(1, _int(env, "MPI_LOCALNRANKS", 1))
        rank = _int(env, "PMI_RANK")
        return LaunchEnv(rank, _int(env, "PMI_SIZE"), _int(env, "MPI_LOCALRANKID", 0), local_world,
                         rank // local_world, addr, port, "mpich")
    if "PMIX_RANK" in env:
        rank = _int(env, "PMIX_RANK")
        size = _int(env, "PMIX_SIZE", 0) or _int(env, "OMPI_COMM_WORLD_SIZE", 0) or _int(env, "SLURM_NTASKS", 0)
        if not size:
            raise ValueError("PMIX_RANK is set but the world size is not (PMIX_SIZE, SLURM_NTASKS)")
        return LaunchEnv(rank, size, _int(env, "PMIX_LOCAL_RANK", 0), _int(env, "PMIX_LOCAL_SIZE", 1),
                         _int(env, "PMIX_NODE_RANK", 0), addr, port, "pmix")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        node = _int(env, "SLURM_NODEID", 0)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        local_world = (_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"], node) if env.get("SLURM_STEP_TASKS_PER_NODE")
                       else _tasks_per_node(env["SLURM_TASKS_PER_NODE"], node) if env.get("SLURM_TASKS_PER_NODE")
                       else 1)
        return LaunchEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", 0),
                         local_world, node, addr, port, "slurm",
                         tuple(expand_hostlist(nodelist)) if nodelist else (), env.get("SLURM_JOB_ID"))
    return LaunchEnv(master_addr=addr, master_port=port)
