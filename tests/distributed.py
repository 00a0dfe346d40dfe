"""Run a function on N gloo ranks, in CPU processes that stay alive between tests.

Process start-up dominates multi-process test time (DESIGN.md: fork ≈0.1 s, spawn ≈4 s, and
each process then imports torch and joins a process group). So a pool of N forked ranks is
built once per world size and reused: `run_on_ranks(fn, n, *args)` sends `fn` (a module-level
function, pickled by reference) to every rank and returns the list of results by rank.

A rank that raises fails the call with that rank's traceback; a call that does not finish in
`timeout` seconds (a hang) fails too. Either way the pool is torn down, so the next call
starts clean instead of inheriting a rank stuck in a collective.
"""
from __future__ import annotations

import atexit
import datetime
import functools
import multiprocessing as mp
import os
import queue
import tempfile
import traceback

COLLECTIVE_TIMEOUT_S = 30


def _join(rank: int, world: int, store_path: str, timeout_s: float) -> None:
    """Join the gloo group of a test: loopback, one thread per rank (N ranks share 2 cores)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _worker(rank: int, world: int, store_path: str, tasks, results) -> None:
    _join(rank, world, store_path, COLLECTIVE_TIMEOUT_S)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # report everything, including assertion failures, to the parent
            results.put((rank, False, traceback.format_exc()))


class RankPool:
    def __init__(self, world: int):
        ctx = mp.get_context("fork")
        self.world = world
        self.store_dir = tempfile.mkdtemp(prefix="gloo-store-")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, world, os.path.join(self.store_dir, "store"), self.tasks[r], self.results))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, args, kwargs, timeout: float):
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: dict[int, object] = {}
        failures: list[str] = []
        deadline = timeout
        while len(out) + len(failures) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=deadline)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                missing = sorted(set(range(self.world)) - set(out))
                message = (f"{fn.__name__} on {self.world} ranks did not finish in {timeout:.0f} s "
                           f"(ranks without a result: {missing}; dead: {dead})\n")
                raise TimeoutError(message + "\n".join(failures)) from None
            if ok:
                out[rank] = value
            else:
                failures.append(f"--- rank {rank} ---\n{value}")
                deadline = 5.0  # peers may now be stuck in a collective: give them a moment, no more
        if failures:
            header = f"{fn.__name__} failed on {len(failures)} of {self.world} ranks:\n"
            raise AssertionError(header + "\n".join(failures))
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)


_POOLS: dict[int, RankPool] = {}


def run_on_ranks(fn, world: int, *args, timeout: float = 90.0, **kwargs) -> list:
    """Run fn(*args, **kwargs) on `world` gloo ranks; returns the results ordered by rank."""
    pool = _POOLS.get(world)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close()
        pool = _POOLS[world] = RankPool(world)
    try:
        return pool.run(fn, args, kwargs, timeout)
    except BaseException:
        pool.close()
        del _POOLS[world]
        raise


@atexit.register
def _close_all() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


@functools.cache
def topology(tp: int = 1, pp: int = 1, dp: int | None = None):
    """Inside a rank: the process groups of a layout, built once per worker and reused."""
    from parallel.topology import build_topology
    return build_topology(tp, pp, dp)


def _one_shot(rank: int, world: int, store_path: str, timeout_s: float, fn, args, results) -> None:
    _join(rank, world, store_path, timeout_s)
    try:
        fn(*args)
        code, message = 0, "ok"
    except BaseException as err:
        code, message = 1, f"{type(err).__name__}: {err}"
    results.put((rank, message))
    results.close()
    results.join_thread()  # the message is out before the process is
    os._exit(code)  # no clean shutdown, as a crashed rank: its peers see the connection close


def run_processes(fn, world: int, *args, collective_timeout: float = 20.0, timeout: float = 60.0) -> dict:
    """Run fn(*args) once on `world` fresh ranks that exit when fn raises, as real launches do.
    Returns {rank: "ok" | "ErrorType: message" | "exit code N"} (a rank that died silently)."""
    ctx = mp.get_context("fork")
    store = os.path.join(tempfile.mkdtemp(prefix="gloo-store-"), "store")
    results = ctx.Queue()
    procs = [ctx.Process(target=_one_shot, args=(r, world, store, collective_timeout, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    if hung:
        raise TimeoutError(f"ranks {hung} were still running after {timeout:.0f} s: a hang")
    out = {}
    while not results.empty():
        rank, message = results.get()
        out[rank] = message
    return {r: out.get(r, f"exit code {procs[r].exitcode}") for r in range(world)}
