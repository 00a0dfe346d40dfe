"""Start N processes of a command on this machine (the demo's `--nproc`), as torchrun would."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, n: int, port: int, fn, argv) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os._exit(fn(argv) or 0)


def run_local(n: int, fn, argv) -> int:
    """Run fn(argv) on n local ranks; returns the worst exit code."""
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, n, port, fn, argv)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max(abs(p.exitcode or 0) for p in procs)
