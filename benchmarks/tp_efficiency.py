"""Parallel efficiency of tensor parallelism on CPU: one process with 2 threads against 2
processes with 1 thread each (tp=2), on the same batch, with and without sequence parallelism.

    python -m benchmarks.tp_efficiency [--rounds 4] [--steps 5] [--profile] [--tiny]

A step is forward + backward into complete gradients (through the trainer's gradient buckets,
which also sum the sp norm gains across tp). efficiency = T(1 process) / T(tp=2): 1.0 is perfect
scaling. The settings take turns round by round (each round: the median of `steps` steps per
setting) so the machine's slow spells hit all of them; printed: the median over rounds.
`--profile` prints, for tp=2 and sp, rank 0's operators by self time (torch.profiler).
`--tiny`: the demo's tiny config (dim 128, a micro-batch of 8 x 128) instead of dim 512.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llama.config import LlamaConfig
from llama.model import Transformer
from parallel.data_parallel import GradBuckets
from parallel.layers import TensorParallel
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology

CFG = LlamaConfig(dim=512, n_layers=4, n_heads=8, vocab_size=4096, multiple_of=64, max_seq_len=256)
BATCH, SEQ = 4, 256
TINY = LlamaConfig(dim=128, n_layers=4, n_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=256), 8, 128
SETTINGS = {"tp=2": dict(sp=False), "tp=2 sp": dict(sp=True), "tp=2 sp keep_gathered": dict(sp=True, keep=True)}


def _steps(model, buckets, tp_group, steps: int) -> float:
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        if tp_group is not None:
            torch.distributed.barrier(tp_group)
        buckets.start_step(1)
        start = time.perf_counter()
        model(tokens, tokens).backward()
        buckets.finish()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _build(tp: TensorParallel | None):
    model = Transformer(CFG, tp=tp, attention="sdpa") if tp else Transformer(CFG, attention="sdpa")
    init_parameters(model, 0)
    buckets = GradBuckets(list(model.parameters()), None, tp_group=tp.group if tp else None)
    return model, buckets


_MODELS: dict = {}


def _tp_step(setting: str, steps: int, profile: bool):
    group = topology(tp=2).tp_group
    torch.set_num_threads(1)
    if setting not in _MODELS:  # kept between rounds: the pool's processes live on
        s = SETTINGS[setting]
        _MODELS[setting] = _build(TensorParallel(group, sp=s["sp"], keep_gathered=s.get("keep", False)))
    model, buckets = _MODELS[setting]
    if not profile:
        return _steps(model, buckets, group, steps)
    with torch.profiler.profile() as prof:
        _steps(model, buckets, group, steps)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:  # the worker processes fork from here: they see the same globals
        global CFG, BATCH, SEQ
        CFG, BATCH, SEQ = TINY
    if args.profile:
        for setting in ("tp=2", "tp=2 sp"):
            print(f"--- {setting}, rank 0 ---\n{run_on_ranks(_tp_step, 2, setting, args.steps, True, timeout=900)[0]}")
        return
    model, buckets = _build(None)
    times: dict[str, list[float]] = {"1 process, 2 threads": [], **{s: [] for s in SETTINGS}}
    for _ in range(args.rounds):
        torch.set_num_threads(2)
        times["1 process, 2 threads"].append(_steps(model, buckets, None, args.steps))
        torch.set_num_threads(1)
        for setting in SETTINGS:
            times[setting].append(max(run_on_ranks(_tp_step, 2, setting, args.steps, False, timeout=900)))
    one = times["1 process, 2 threads"]
    print(f"LLaMA dim={CFG.dim} layers={CFG.n_layers} vocab={CFG.vocab_size}, batch {BATCH}x{SEQ}, fp32, forward + "
          f"backward into gradient buckets; median of {args.rounds} rounds of {args.steps} steps")
    print(f"{'setting':<24} {'step s':>7} {'efficiency':>11} {'per round':>24}")
    for name, t in times.items():
        per_round = " ".join(f"{a / b:.2f}" for a, b in zip(one, t))
        print(f"{name:<24} {statistics.median(t):>7.3f} {statistics.median(a / b for a, b in zip(one, t)):>11.2f} "
              f"{per_round:>24}")


if __name__ == "__main__":
    main()
