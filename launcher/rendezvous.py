"""Where rank 0 listens: MASTER_ADDR/MASTER_PORT when set; under SLURM the first host of the
node list and a port derived from the job id; under MPI rank 0's address and a free port,
broadcast with mpi4py."""
from __future__ import annotations

import re
import socket
import subprocess

from launcher.env import LaunchEnv


class RendezvousError(RuntimeError):
    pass


def resolve_host(host: str) -> str | None:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return None


def slurm_node_address(host: str) -> str | None:
    """The NodeAddr SLURM has for `host` (emulated nodes' names do not resolve)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else None


def slurm_port(job_id: str | None, step_id: str | None = None) -> int:
    """A port in [20000, 60000) from the job and step ids: every rank computes the same one,
    and two job steps of one job on the same node do not collide."""
    if not job_id:
        raise RendezvousError("under SLURM without SLURM_JOB_ID: set MASTER_PORT")
    return 20000 + (int(job_id) * 17 + int(step_id or 0)) % 40000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def routable_address(single_host: bool) -> str:
    """This host's address for other hosts to reach: not a loopback one (Debian maps the host name
    to 127.0.1.1), unless every rank is on this host."""
    names = {socket.getfqdn(), socket.gethostname()}
    found = []
    for name in names:
        try:
            found += [info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)]
        except OSError:
            pass
    outside = [a for a in found if not a.startswith("127.")]
    if outside:
        return outside[0]
    if single_host:
        return "127.0.0.1"
    raise RendezvousError(f"rank 0's host name resolves only to loopback ({sorted(set(found))}): set MASTER_ADDR "
                          "to an address the other nodes can reach")


def _mpi_rendezvous(env: LaunchEnv) -> tuple[str, int]:
    try:
        from mpi4py import MPI
    except ImportError:
        raise RendezvousError(f"launched by {env.launcher} without mpi4py: set MASTER_ADDR and MASTER_PORT, or "
                              "`pip install mpi4py` so rank 0 can share its address") from None
    comm = MPI.COMM_WORLD
    mine = None
    if comm.Get_rank() == 0:  # what rank 0 finds, or why it cannot, goes to every rank
        try:
            addr = env.master_addr or routable_address(env.local_world_size == env.world_size)
            mine = (addr, env.master_port or free_port())
        except RendezvousError as err:
            mine = str(err)
    mine = comm.bcast(mine, root=0)
    if isinstance(mine, str):
        raise RendezvousError(mine)
    return mine


def rendezvous(env: LaunchEnv, slurm_step: str | None = None) -> tuple[str | None, int | None]:
    """(address, port) of rank 0's store, or (None, None) for a single process."""
    if env.world_size == 1:
        return env.master_addr, env.master_port
    if env.master_addr and env.master_port:
        return env.master_addr, env.master_port
    if env.launcher == "slurm":
        if not env.nodes:
            raise RendezvousError("under SLURM without SLURM_JOB_NODELIST: set MASTER_ADDR and MASTER_PORT")
        first = env.nodes[0]
        addr = env.master_addr or resolve_host(first) or slurm_node_address(first)
        if addr is None:
            raise RendezvousError(f"cannot resolve the first SLURM node {first!r}: set MASTER_ADDR")
        return addr, env.master_port or slurm_port(env.job_id, slurm_step)
    if env.launcher in ("openmpi", "mpich", "pmix"):
        return _mpi_rendezvous(env)
    raise RendezvousError(f"rank {env.rank} of {env.world_size} ({env.launcher}) has no rendezvous: set "
                          "MASTER_ADDR and MASTER_PORT")
