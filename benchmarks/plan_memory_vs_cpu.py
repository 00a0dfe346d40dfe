"""llama-plan's memory per process against the peak measured on CPU, for several layouts.

    python -m benchmarks.plan_memory_vs_cpu [--steps 2]

Each layout trains a few steps of a small config on the byte corpus; every rank measures the most
tensor bytes it holds at once (`parallel.memory.PeakTensorMemory`: every storage an operator makes,
until it dies; what `torch.cuda.max_memory_allocated` reports on a GPU). Beside it, the planner's
prediction for that rank's pipeline stage (`llama.perf_model.memory`: weights, gradient buckets,
optimizer state from the real set-up on the meta device, plus its activation and logits terms).
Goal: each within 10%.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from llama.config import load_config
from llama.perf_model import Layout, memory
from llama.setup import human_bytes
from parallel.memory import PeakTensorMemory
from tests.distributed import run_on_ranks, topology

# The tiny config at its own sequence length, and a wider one whose activations outweigh its weights.
CONFIGS = {"tiny": {}, "wide": dict(dim=256, n_heads=8, vocab_size=512, max_seq_len=256)}
LAYOUTS = [  # (config, label, layout, dtype)
    ("tiny", "1 process", Layout(1, 1, 1, micro_batch=8, recompute="none"), "fp32"),
    ("tiny", "1 process, selective", Layout(1, 1, 1, micro_batch=8, recompute="selective"), "fp32"),
    ("tiny", "tp=2", Layout(2, 1, 1, micro_batch=8, recompute="none"), "fp32"),
    ("tiny", "tp=2 + sp", Layout(2, 1, 1, micro_batch=8, sp=True, recompute="none"), "fp32"),
    ("tiny", "pp=2", Layout(1, 2, 1, micro_batch=4, recompute="none"), "fp32"),
    ("tiny", "dp=2 + ZeRO-1", Layout(1, 1, 2, micro_batch=4, recompute="none", distributed_optimizer=True), "fp32"),
    ("wide", "1 process", Layout(1, 1, 1, micro_batch=4, recompute="none"), "fp32"),
    ("wide", "1 process, full", Layout(1, 1, 1, micro_batch=4, recompute="full"), "fp32"),
    ("wide", "tp=2 + sp, selective", Layout(2, 1, 1, micro_batch=4, sp=True, recompute="selective"), "fp32"),
    ("wide", "pp=2 vpp=2", Layout(1, 2, 1, vpp=2, micro_batch=2, recompute="none"), "fp32"),
    ("wide", "tp=2, bf16", Layout(2, 1, 1, micro_batch=4, recompute="none"), "bf16"),
]


def _config(name: str, layout: Layout, steps: int):
    run = load_config("tiny")
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, **CONFIGS[name]),
                              data=dataclasses.replace(run.data, sources=[], tokenizer=""))
    run = layout.apply(run)
    run.train.steps, run.train.log_every = steps, 1000
    if name == "wide":
        run.train.seq_len, run.train.global_batch = 256, 16
    return run


def _measure(name: str, layout: Layout, steps: int, dtype: str) -> tuple[int, int]:
    from llama.train import ByteDemoData, train
    torch.set_num_threads(1)
    run = _config(name, layout, steps)
    run.train.dtype = dtype
    topo = topology(layout.tp, layout.pp, layout.dp)
    data = ByteDemoData(run.train.seq_len, 0)
    with PeakTensorMemory() as watch:
        train(run, topo, show_progress=False, data=data)
    return topo.pp_rank, watch.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    print(f"{'config':<6} {'layout':<22} {'pp rank':>7} {'measured':>11} {'predicted':>11} {'ratio':>6}   "
          "predicted: weights, gradients, optimizer, activations, logits, working set")
    for name, label, layout, dtype in LAYOUTS:
        world = layout.tp * layout.pp * layout.dp
        peaks = [_measure(name, layout, args.steps, dtype)] if world == 1 else \
            run_on_ranks(_measure, world, name, layout, args.steps, dtype, timeout=600)
        run = _config(name, layout, args.steps)
        run.train.dtype = dtype
        for pp_rank in sorted({r for r, _ in peaks}):
            measured = max(peak for r, peak in peaks if r == pp_rank)
            mem = memory(run, world, pp_rank, device="cpu")
            parts = ", ".join(human_bytes(mem[k]) for k in ("weights", "gradients", "optimizer", "activations",
                                                            "logits", "working"))
            print(f"{name:<6} {label:<22} {pp_rank:>7} {human_bytes(measured):>11} {human_bytes(mem['total']):>11} "
                  f"{mem['total'] / measured:6.2f}   {parts}", flush=True)


if __name__ == "__main__":
    main()
