"""Step time of a tensor-parallel LLaMA with the backward overlap on and off, and their ratio.

    python -m benchmarks.tp_overlap [--tp 2] [--steps 8]

Both settings run in the same processes, interleaved step by step, so machine noise hits both.
Overlap: a column layer's input-gradient collective runs while its weight-gradient GEMM computes
(and under sp the input re-gather while the input-gradient GEMM computes).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from llama.config import LlamaConfig
from llama.model import Transformer
from parallel.layers import TensorParallel
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology

CFG = LlamaConfig(dim=512, n_layers=4, n_heads=8, vocab_size=1024, multiple_of=64, max_seq_len=512)


def _time_steps(tp_size: int, sp: bool, steps: int, batch: int, seq: int):
    group = topology(tp=tp_size).tp_group
    models = {}
    for overlap in (True, False):
        models[overlap] = Transformer(CFG, tp=TensorParallel(group, sp=sp, overlap=overlap), attention="sdpa")
        init_parameters(models[overlap], 0)
    torch.manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (batch, seq))
    times = {True: [], False: []}
    for step in range(steps + 1):
        for overlap in ((True, False) if step % 2 else (False, True)):
            torch.distributed.barrier(group)
            start = time.perf_counter()
            models[overlap](tokens, tokens).backward()
            times[overlap].append(time.perf_counter() - start)
    return {k: statistics.median(v[1:]) for k, v in times.items()}  # the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    print(f"LLaMA dim={CFG.dim} layers={CFG.n_layers} batch={args.batch} seq={args.seq}, tp={args.tp} on gloo (CPU), "
          f"median forward+backward of {args.steps} steps")
    print(f"{'sp':>5} {'overlap on (s)':>15} {'overlap off (s)':>16} {'on/off':>8}")
    for sp in (False, True):
        t = run_on_ranks(_time_steps, args.tp, args.tp, sp, args.steps, args.batch, args.seq, timeout=600)[0]
        print(f"{str(sp):>5} {t[True]:>15.3f} {t[False]:>16.3f} {t[True] / t[False]:>8.3f}")


if __name__ == "__main__":
    main()
