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
        sizes = [s for s, _ in self.gemm_curve]
        i = bisect.bisect_left(sizes, one_gemm_flops)
        if i == 0 or i == len(sizes):
            rate = self.gemm_curve[min(i, len(sizes) - 1)][1]
        else:  # log-linear between the two measured sizes
            (s0, r0), (s1, r1) = self.gemm_curve[i - 1], self.gemm_curve[i]
            w = math.log(one_gemm_flops / s0) / math.log(s1 / s0)
            rate = r0 + w * (r1 - r0)
        return flops / rate

    def attention_s(self, flops: float) -> float:
        return flops / (self.peak_tflops * 1e12 * self.attention_efficiency)

    def memory_s(self, nbytes: float) -> float:
        return nbytes / (self.hbm_gbps * 1e9)

    def link_s(self, nbytes: float, messages: float, inter_node: bool) -> float:
        """Seconds to send `nbytes` in `messages` messages over one link."""
        if inter_node:
            return messages * self.inter_latency_s + nbytes / (self.inter_node_gbps * 1e9)
        return messages * self.intra_latency_s + nbytes / (self.intra_node_gbps * 1e9)


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


def _best_of(fn, repeats: int = 5, min_s: float = 0.05) -> float:
    """Seconds of one call: the best of `repeats` timings of enough calls to last `min_s`."""
    fn()
    n, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - start
        if t >= min_s:
            break
        n *= 2
    best = t / n
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def measure_compute(dtype_name: str = "fp32") -> dict:
    """GEMM rates by size, causal attention (forward + backward) rate, memory bandwidth of an
    elementwise kernel that allocates its output (as training's do), and the cost of one small op."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    curve = []
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        curve.append([2.0 * m * k * n, 2.0 * m * k * n / _best_of(lambda a=a, b=b: a @ b)])
    q = torch.randn(4, 4, 256, 32, dtype=dtype, requires_grad=True)

    def attention():
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    att_flops = 2.0 * 4 * 4 * 256 * 256 * 32 * (1 + 2.5)
    x, y = torch.randn(1 << 20, dtype=dtype), torch.randn(1 << 20, dtype=dtype)
    hbm = 3 * x.numel() * x.element_size() / _best_of(lambda: x + y)
    s1, s2 = torch.randn(8, dtype=dtype), torch.randn(8, dtype=dtype)
    return {"gemm_curve": curve, "attention_tflops": att_flops / _best_of(attention) / 1e12,
            "hbm_gbps": hbm / 1e9, "launch_s": _best_of(lambda: s1 + s2)}


def _worker(rank: int, world: int, store_path: str, dtype_name: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    dist.barrier()
    busy = measure_compute(dtype_name)  # every process at once: the node busy
    dist.barrier()
    link = {}
    if rank < 2:  # ping-pong between ranks 0 and 1: latency from 8 B, bandwidth from 16 MiB
        for nbytes in (8, 16 << 20):
            buf = torch.zeros(nbytes // 4)

            def ping(buf=buf):
                if rank == 0:
                    dist.send(buf, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
            link[nbytes] = _best_of(ping, repeats=3) / 2
    dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"busy": busy, "link": link}))
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
            measured = {"busy": alone, "link": {"8": 1e-5, str(16 << 20): 1e-2}}
    busy, link = measured["busy"], {int(k): v for k, v in measured["link"].items()}
    latency = link[8]
    bandwidth = (16 << 20) / max(link[16 << 20] - latency, 1e-9) / 1e9

    def rates(m: dict) -> dict:
        peak = max(rate for _, rate in m["gemm_curve"]) / 1e12  # the best GEMM stands for the "peak"
        return {"gemm_curve": m["gemm_curve"], "peak_tflops": peak, "gemm_efficiency": 1.0,
                "attention_efficiency": m["attention_tflops"] / peak, "hbm_gbps": m["hbm_gbps"],
                "launch_s": m["launch_s"]}
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    result = {**rates(busy), "alone": rates(alone), "gpus_per_node": processes,
              "memory_gb": total_gb / processes, "memory_reserved_gb": 0.5,  # a torch process's own RSS
              "intra_node_gbps": bandwidth, "inter_node_gbps": bandwidth,
              "intra_latency_s": latency, "inter_latency_s": latency, "power_w": 0.0,
              "calibrated_at": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": dtype_name}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return result
