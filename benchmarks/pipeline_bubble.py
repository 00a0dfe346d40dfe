"""Pipeline bubble: measured idle fraction of each schedule against the theory.

    python -m benchmarks.pipeline_bubble [--pp 4] [--m 8] [--vpp 2]

Theory (Narayanan et al. 2021), as a fraction of the step: 1F1B and GPipe (p−1)/(m+p−1);
interleaved with v chunks per rank (p−1)/(v·m+p−1). Measured: the time each rank spent blocked
on receives divided by the step's wall time, averaged over ranks and steps. On a 2-core machine
running 4 ranks the stages also compete for cores, so read the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse

import torch

from llama.config import LlamaConfig
from llama.parallelize import activation_shape, build_chunks
from parallel.pipeline.p2p import PipelineP2P
from parallel.pipeline.schedules import run_schedule
from tests.distributed import run_on_ranks, topology

MB, SEQ = 2, 64


def _measure(pp, m, schedule, vpp, layers, steps):
    cfg = LlamaConfig(dim=256, n_layers=layers, n_heads=8, vocab_size=256, multiple_of=64, max_seq_len=SEQ)
    topo = topology(pp=pp)
    chunks = build_chunks(cfg, topo, vpp=vpp, seed=0, attention="sdpa")
    p2p = PipelineP2P(topo, ring=vpp > 1)
    gen = torch.Generator().manual_seed(0)
    micro = [(t[:, :-1], t[:, 1:]) for t in torch.randint(0, cfg.vocab_size, (m, MB, SEQ + 1), generator=gen)]
    bubbles = []
    for step in range(steps + 1):
        torch.distributed.barrier(topo.pp_group)
        stats = run_schedule(schedule, chunks, micro, p2p, pp,
                             topo.pp_rank, activation_shape(cfg, MB, SEQ, 1, False), torch.float32)
        for c in chunks:
            c.zero_grad()
        if step:  # the first step warms up
            bubbles.append(stats.bubble)
    return sum(bubbles) / len(bubbles), stats.peak_in_flight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--vpp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    p, m, v = args.pp, args.m, args.vpp
    layers = p * v * 2
    print(f"pp={p}, m={m} micro-batches of {MB}x{SEQ}, {layers} layers of dim 256, gloo on CPU")
    print(f"{'schedule':>12} {'measured':>9} {'theory':>7} {'ratio':>6} {'peak kept (stage 0)':>20}")
    for schedule, vpp in (("gpipe", 1), ("1f1b", 1), ("interleaved", v)):
        out = run_on_ranks(_measure, p, p, m, schedule, vpp, layers, args.steps, timeout=600)
        measured = sum(b for b, _ in out) / p
        theory = (p - 1) / (vpp * m + p - 1)
        print(f"{schedule + (f' v={vpp}' if vpp > 1 else ''):>12} {measured:>9.3f} {theory:>7.3f} "
              f"{measured / theory:>6.2f} {out[0][1]:>20}")


if __name__ == "__main__":
    main()
