"""gloo's own collectives against the rings of point-to-point messages in `parallel.ring`.

    python -m benchmarks.ring_collectives [--mb 2 --ranks 2 4 --rounds 30]

CPU processes over gloo, one thread each; per collective the median time of --rounds calls after
a barrier, for the two implementations interleaved call by call, and the ratio ring / gloo
(median of per-round ratios). The buffer is the full tensor: the all-reduced one, the
reduce-scatter's input, the all-gather's output.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from benchmarks.timing import medians, paired_ratio
from parallel import ring
from tests.distributed import run_on_ranks, topology


def _cases(full: torch.Tensor, n: int, group):
    """Both sides allocate their output per call, as `parallel.comm` does."""
    shard = full[: full.shape[0] // n].clone()
    return {
        "all_reduce": (lambda: dist.all_reduce(full, group=group), lambda: ring.all_reduce_start(full, group)()),
        "reduce_scatter": (lambda: dist.reduce_scatter_tensor(torch.empty_like(shard), full, group=group),
                           lambda: ring.reduce_scatter_start(full, group)()),
        "all_gather": (lambda: dist.all_gather_into_tensor(torch.empty_like(full), shard, group=group),
                       lambda: ring.all_gather_start(shard, group)()),
    }


def _measure(n: int, mb: float, rounds: int):
    group = topology(tp=n).tp_group
    full = torch.randn(int(mb * 2**20 / 4 / 512 / n) * n, 512)
    results = {}
    for name, (gloo, ours) in _cases(full, n, group).items():
        times = {"gloo": [], "ring": []}
        for i in range(rounds + 2):
            for side, fn in (("gloo", gloo), ("ring", ours)) if i % 2 else (("ring", ours), ("gloo", gloo)):
                dist.barrier(group)
                start = time.perf_counter()
                fn()
                if i >= 2:  # two warm-up rounds
                    times[side].append(time.perf_counter() - start)
        results[name] = (medians(times), paired_ratio(times, "ring", "gloo"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=2.0, help="buffer size in MB (fp32)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"gloo collectives against parallel.ring, {args.mb:g} MB fp32 buffer, CPU processes, median of "
          f"{args.rounds} calls")
    print(f"{'ranks':>5} {'collective':>15} {'gloo (ms)':>10} {'ring (ms)':>10} {'ring / gloo':>12}")
    for n in args.ranks:
        for name, (med, ratio) in run_on_ranks(_measure, n, n, args.mb, args.rounds, timeout=600)[0].items():
            print(f"{n:>5} {name:>15} {med['gloo'] * 1e3:>10.2f} {med['ring'] * 1e3:>10.2f} {ratio:>12.2f}")


if __name__ == "__main__":
    main()
