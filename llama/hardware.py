"""The hardware table of the planner: `configs/hardware/gpus.yaml` (data-sheet GPUs) and
`cpu-local`, this machine, measured by `llama-plan --calibrate`.

A `Hardware` turns work into seconds: matmul FLOPs at the GEMM rate (peak × efficiency for a
GPU; on cpu-local a measured curve of rate against the size of one GEMM, since a CPU's rate
climbs with size over the range a small model spans), attention FLOPs at the attention rate,
bytes at the memory bandwidth, kernels at the launch cost, and messages at latency + bytes over
the link's bandwidth (NVLink inside a node, the network between nodes).

On cpu-local a "GPU" is a process with one thread, a node is the machine, and the rates are
measured twice: one process alone, and every core busy at once (they share memory bandwidth and
clocks); a job with one process on the node runs at the first, any other at the second.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from llama.config import CONFIG_DIR, ConfigError

TABLE = CONFIG_DIR / "hardware" / "gpus.yaml"
CALIBRATION = Path(os.environ.get("LLAMA_PLAN_CALIBRATION",
                                  Path.home() / ".cache" / "llama-parallel" / "cpu-local.json"))


@dataclass
class Hardware:
    name: str
    description: str = ""
    device: str = "cuda"            # the torch device type the model runs on there
    peak_tflops: float = 0.0
    memory_gb: float = 0.0
    memory_reserved_gb: float = 0.0
    hbm_gbps: float = 0.0
    gpus_per_node: int = 8
    intra_node_gbps: float = 0.0
    inter_node_gbps: float = 0.0
    intra_latency_s: float = 0.0
    inter_latency_s: float = 0.0
    gemm_efficiency: float = 1.0
    attention_efficiency: float = 1.0
    launch_s: float = 0.0
    power_w: float = 0.0
    # cpu-local: measured GEMM rate (FLOP/s) against one GEMM's FLOPs, and the one-process-alone rates
    gemm_curve: list = field(default_factory=list)   # [[flops of one GEMM, FLOP/s], ...] ascending
    # cpu-local: what one collective costs a process beside its compute, measured between 2 processes:
    # op -> [[buffer bytes, seconds when waited for at once, seconds when overlapped with a GEMM], ...]
    collective_curve: dict = field(default_factory=dict)
    memory_curve: list = field(default_factory=list)  # [[bytes one elementwise kernel moves, GB/s], ...]
    alone: dict = field(default_factory=dict)        # field -> value when one process has the node

    def on_node(self, processes: int) -> Hardware:
        """The rates that hold when `processes` processes share a node (cpu-local only differs)."""
        if processes > 1 or not self.alone:
            return self
        return Hardware(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **self.alone, "alone": {}})

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gb - self.memory_reserved_gb) * 2**30

    def gemm_s(self, flops: float, one_gemm_flops: float | None = None) -> float:
        """Seconds for `flops` of matmuls done in GEMMs of `one_gemm_flops` each."""
        if not self.gemm_curve or one_gemm_flops is None:
            return flops / (self.peak_tflops * 1e12 * self.gemm_efficiency)
        return flops / _along(self.gemm_curve, one_gemm_flops)

    def attention_s(self, flops: float) -> float:
        return flops / (self.peak_tflops * 1e12 * self.attention_efficiency)

    def memory_s(self, nbytes: float, one_kernel_bytes: float | None = None) -> float:
        """Seconds for kernels that read and write `nbytes`, `one_kernel_bytes` each (on cpu-local
        the rate falls as tensors outgrow the caches and, larger still, as fresh pages fault in)."""
        if not self.memory_curve or one_kernel_bytes is None:
            return nbytes / (self.hbm_gbps * 1e9)
        return nbytes / (_along(self.memory_curve, one_kernel_bytes) * 1e9)

    def link_s(self, nbytes: float, messages: float, inter_node: bool) -> float:
        """Seconds to send `nbytes` in `messages` messages over one link."""
        if inter_node:
            return messages * self.inter_latency_s + nbytes / (self.inter_node_gbps * 1e9)
        return messages * self.intra_latency_s + nbytes / (self.intra_node_gbps * 1e9)


    def collective_s(self, op: str, buffer_bytes: float, calls: float, overlapped: bool = False) -> float:
        """cpu-local: seconds that `calls` calls of `op` (`buffer_bytes` in all, as parallel.comm
        counts them) add to a process's step: the least-squares line (a cost per call plus one per
        byte) through the measured points, which are too noisy one by one to interpolate between.
        Only where `collective_curve` has `op`; GPUs use `link_s`."""
        if not calls:
            return 0.0
        per_call, per_byte = _line([(p[0], p[2 if overlapped else 1]) for p in self.collective_curve[op]])
        return calls * per_call + buffer_bytes * per_byte


def _along(curve: list, x: float) -> float:
    """The measured `curve` ([[x, rate], ...], ascending x) at `x`: log-linear between its points,
    its end values beyond them."""
    xs = [p[0] for p in curve]
    i = bisect.bisect_left(xs, x)
    if i == 0 or i == len(xs):
        return curve[min(i, len(xs) - 1)][1]
    (x0, r0), (x1, r1) = curve[i - 1], curve[i]
    return r0 + math.log(x / x0) / math.log(x1 / x0) * (r1 - r0)


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) ≥ 0 of the least-squares line t = a + b·x through `points`."""
    n = len(points)
    mx, mt = sum(x for x, _ in points) / n, sum(t for _, t in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = max(sum((x - mx) * (t - mt) for x, t in points) / sxx, 0.0) if sxx else 0.0
    a = mt - b * mx
    if a < 0:  # through the origin instead
        a, b = 0.0, sum(x * t for x, t in points) / sum(x * x for x, _ in points)
    return a, b


def names() -> list[str]:
    return sorted(yaml.safe_load(TABLE.read_text()))


def load(name: str, calibration: Path | None = None) -> Hardware:
    """The table's entry `name`; cpu-local from its calibration file (measured now if missing)."""
    table = yaml.safe_load(TABLE.read_text())
    if name not in table:
        raise ConfigError(f"unknown --gpu {name!r}; the hardware table ({TABLE.name}) has {sorted(table)}")
    entry = dict(table[name])
    if entry.pop("calibrated", False):
        path = Path(calibration or CALIBRATION)
        if not path.is_file():
            calibrate(path)
        entry.update(json.loads(path.read_text()))
    known = {f.name for f in fields(Hardware)}
    return Hardware(name=name, **{k: v for k, v in entry.items() if k in known})


# ----------------------------------------------------------------------------------------------
# Calibration of cpu-local: each process uses one thread, as the benchmarks' runs do.

GEMM_SHAPES = [(64, 64, 64), (128, 128, 128), (256, 128, 128), (256, 256, 256), (512, 256, 256), (512, 512, 512),
               (1024, 512, 512), (1024, 1024, 1024), (2048, 1024, 1024)]


MEMORY_SIZES = [1 << 16, 1 << 18, 1 << 20, 1 << 22]  # elements of one elementwise kernel's operands


def _median_time(fn, calls: int, repeats: int) -> float:
    """Seconds of one call: the median over `repeats` timings of `calls` calls (after one more)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return sorted(times)[len(times) // 2]


def _typical(fn, repeats: int = 7, min_s: float = 0.05) -> float:
    """Seconds of one call: the median of `repeats` timings of enough calls to last `min_s`. The
    median, not the best: a shared machine's noise is part of every step the planner predicts.
    (The number of calls depends on this process's timing: not for calls another rank matches.)"""
    fn()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start >= min_s:
            break
        n *= 2
    return _median_time(fn, n, repeats)


def op_overhead_s() -> float:
    """What one operator of our model costs beyond its arithmetic in eager mode on this machine:
    the Python of the autograd Functions and modules, dispatch, and the autograd engine. Timed on
    the real model at a size where arithmetic is negligible (1 sequence of 8 tokens, dim 64): the
    forward and backward of 3 layers less that of 1, over the operators two layers launch (as
    `llama.step_profile` counts them, here on the real run). It plays the part of a GPU's kernel
    launch cost (`launch_s`)."""
    import torch

    from llama.config import LlamaConfig
    from llama.model import Transformer
    from llama.step_profile import Work, _CountOps
    cfg = LlamaConfig(dim=64, n_heads=4, n_layers=1, vocab_size=256, multiple_of=32, max_seq_len=8)
    x = torch.zeros(1, 8, dtype=torch.long)
    seconds, kernels = {}, {}
    for layers in (1, 3):
        model = Transformer(dataclasses.replace(cfg, n_layers=layers), attention="sdpa", recompute="none")
        seconds[layers] = _typical(lambda model=model: model(x, x).backward(), min_s=0.1)
        work = Work()
        with _CountOps(work):
            model(x, x).backward()
        kernels[layers] = work.kernels
    return max(seconds[3] - seconds[1], 0.0) / (kernels[3] - kernels[1])


COLD_BYTES = 64 << 20  # operands cycled through per measurement: more than the caches hold


def _cold(make, nbytes: int, op):
    """`op` over copies of the operands `make()` returns, taken in turn from a pool of at least
    COLD_BYTES, so each call finds them out of cache, as training's kernels find theirs."""
    pool = [make() for _ in range(max(1, -(-COLD_BYTES // nbytes)))]
    turn = iter(range(1 << 62))
    return lambda: op(*pool[next(turn) % len(pool)])


def measure_compute(dtype_name: str = "fp32") -> dict:
    """GEMM rates by size, causal attention (forward + backward) rate, memory bandwidth of an
    elementwise kernel that allocates its output (as training's do) by size, all on operands
    out of cache; and what one of our model's operators costs beyond its arithmetic."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    elt = torch.finfo(dtype).bits // 8
    curve = []
    for m, k, n in GEMM_SHAPES:
        gemm = _cold(lambda m=m, k=k, n=n: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)),
                     (m * k + k * n) * elt, torch.matmul)
        curve.append([2.0 * m * k * n, 2.0 * m * k * n / _typical(gemm)])
    q = torch.randn(4, 4, 256, 32, dtype=dtype, requires_grad=True)

    def attention():
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    att_flops = 2.0 * 4 * 4 * 256 * 256 * 32 * (1 + 2.5)
    memory = []
    for n in MEMORY_SIZES:
        add = _cold(lambda n=n: (torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)), 2 * n * elt, torch.add)
        moved = 3 * n * elt  # x + y into a new tensor
        memory.append([moved, moved / _typical(add) / 1e9])
    return {"gemm_curve": curve, "attention_tflops": att_flops / _typical(attention) / 1e12,
            "memory_curve": memory, "hbm_gbps": max(r for _, r in memory), "launch_s": op_overhead_s()}


COLLECTIVE_SIZES = [4 << 10, 64 << 10, 512 << 10, 8 << 20]  # buffer bytes
COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


def _collective_starter(op: str, nbytes: int, group, rank: int):
    """A function that starts one `op` over `nbytes` of buffer (as parallel.comm counts it: the
    reduced or gathered tensor, the sent one) between ranks 0 and 1, and returns its `finish`."""
    import torch
    import torch.distributed as dist

    from parallel import comm
    full = torch.zeros(nbytes // 4)
    if op == "all_reduce":
        return lambda: comm.all_reduce_start(full, group)
    if op == "all_gather":
        shard = torch.zeros(nbytes // 8)
        return lambda: comm.all_gather_start(shard, group)
    if op == "reduce_scatter":
        return lambda: comm.reduce_scatter_start(full, group)
    send_or_recv = dist.isend if rank == 0 else dist.irecv  # one way, as a pipeline stage sends
    return lambda: send_or_recv(full, 1 - rank, group).wait


def measure_collectives(rank: int, group, rounds: int = 9, iters: int = 6) -> dict:
    """What each collective adds to a process that computes between collectives, as training
    does: the time of (GEMM, then the collective waited for) and of (collective started, GEMM,
    waited for) less the GEMM's own, per call; the median over `rounds`. On a CPU this includes
    what a wait costs beyond the wire (waking gloo's threads, the peer's skew) and the CPU time
    the collective takes from the GEMM beside it."""
    import torch
    import torch.distributed as dist
    a = torch.randn(512, 512)
    gemm = lambda: a @ a  # noqa: E731  about 2-3 ms: a layer's worth of work on a small model
    curve = {}
    for op in COLLECTIVE_OPS:
        points = []
        for nbytes in COLLECTIVE_SIZES:
            start = _collective_starter(op, nbytes, group, rank)

            def blocking(start=start):
                gemm()
                start()()

            def overlapped(start=start):
                finish = start()
                gemm()
                finish()
            extra = {blocking: [], overlapped: []}
            for _ in range(rounds):
                times = {}
                for fn in (gemm, blocking, overlapped):
                    dist.barrier(group)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        fn()
                    times[fn] = (time.perf_counter() - t0) / iters
                for fn in extra:
                    extra[fn].append(max(times[fn] - times[gemm], 0.0))
            points.append([nbytes, *(sorted(v)[len(v) // 2] for v in extra.values())])
        curve[op] = points
    return curve


def _worker(rank: int, world: int, store_path: str, dtype_name: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    dist.barrier()
    busy = measure_compute(dtype_name)  # every process at once: the node busy
    dist.barrier()
    pair = dist.new_group([0, 1])
    link, collectives = {}, {}
    if rank < 2:
        collectives = measure_collectives(rank, pair)
    dist.barrier()
    if rank < 2:  # ping-pong between ranks 0 and 1: latency from 8 B, bandwidth from 16 MiB
        for nbytes, calls in ((8, 500), (16 << 20, 8)):  # fixed counts: both ranks make the same calls
            buf = torch.zeros(nbytes // 4)

            def ping(buf=buf):
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
            link[nbytes] = _median_time(ping, calls, repeats=3) / 2
    dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"busy": busy, "link": link, "collectives": collectives}))
    dist.destroy_process_group()


def calibrate(path: Path, processes: int | None = None, dtype_name: str = "fp32") -> dict:
    """Measure cpu-local (about 20 s) and write it to `path`; returns the measured fields."""
    import tempfile

    import torch.multiprocessing as mp
    processes = processes or os.cpu_count() or 1
    alone = measure_compute(dtype_name)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "busy.json")
        if processes > 1:
            mp.start_processes(_worker, args=(processes, os.path.join(tmp, "store"), dtype_name, out),
                               nprocs=processes, start_method="spawn")
            measured = json.loads(Path(out).read_text())
        else:
            measured = {"busy": alone, "link": {"8": 1e-5, str(16 << 20): 1e-2}, "collectives": {}}
    busy, link = measured["busy"], {int(k): v for k, v in measured["link"].items()}
    latency = link[8]
    bandwidth = (16 << 20) / max(link[16 << 20] - latency, 1e-9) / 1e9

    def rates(m: dict) -> dict:
        peak = max(rate for _, rate in m["gemm_curve"]) / 1e12  # the best GEMM stands for the "peak"
        return {"gemm_curve": m["gemm_curve"], "peak_tflops": peak, "gemm_efficiency": 1.0,
                "attention_efficiency": m["attention_tflops"] / peak, "hbm_gbps": m["hbm_gbps"],
                "memory_curve": m["memory_curve"],
                "launch_s": m["launch_s"]}
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    result = {**rates(busy), "alone": rates(alone), "gpus_per_node": processes,
              "memory_gb": total_gb / processes, "memory_reserved_gb": 0.5,  # a torch process's own RSS
              "intra_node_gbps": bandwidth, "inter_node_gbps": bandwidth,
              "intra_latency_s": latency, "inter_latency_s": latency, "power_w": 0.0,
              "collective_curve": measured["collectives"],
              "calibrated_at": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": dtype_name}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return result
