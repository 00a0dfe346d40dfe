"""llama-plan's step time on cpu-local against our own measured runs on this machine.

    python -m benchmarks.plan_vs_cpu [--steps 10 --rounds 3]

This machine is shared and its speed drifts by 20-30% from minute to minute, so each round
calibrates cpu-local afresh (as `llama-plan --calibrate` does, into a temporary file) and then
trains each layout of the tiny config (1 process, tp=2, tp=2+sp, pp=2, dp=2) for a few steps on
the byte corpus, one thread per process; the median step time (steps after the first two) is
printed beside the planner's prediction for the same layout, and the last table gives each
layout's median ratio over the rounds. Goal: each within 15%.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from llama.config import load_config
from llama.hardware import calibrate, load
from llama.perf_model import Layout, predict
from tests.distributed import run_on_ranks, topology

TINY = dict(micro_batch=8, recompute="none")  # the tiny config's own choices
LAYOUTS = [("1 process", Layout(1, 1, 1, **TINY)), ("tp=2", Layout(2, 1, 1, **TINY)),
           ("tp=2 + sp", Layout(2, 1, 1, sp=True, **TINY)), ("pp=2", Layout(1, 2, 1, **TINY)),
           ("dp=2", Layout(1, 1, 2, micro_batch=4, recompute="none"))]


def _run(layout: Layout, steps: int) -> float | None:
    from llama.train import ByteDemoData, train
    torch.set_num_threads(1)
    run = _tiny(layout, steps)
    topo = topology(layout.tp, layout.pp, layout.dp)
    path = os.path.join(tempfile.mkdtemp(), "m.jsonl") if topo.rank == 0 else None
    train(run, topo, show_progress=False, metrics_path=path, data=ByteDemoData(run.train.seq_len, 0))
    if path is None:
        return None
    times = [json.loads(line)["step_s"] for line in open(path)][2:]
    return statistics.median(times)


def _tiny(layout: Layout, steps: int):
    run = layout.apply(load_config("tiny"))
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, sources=[], tokenizer=""))
    run.train.steps, run.train.log_every = steps, 1000
    return run


def _round(steps: int) -> dict[str, float]:
    """Calibrate, then measure and predict every layout; prints a table, returns the ratios."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cpu-local.json"
        calibrate(path)
        hw = load("cpu-local", calibration=path)
    print(f"cpu-local calibrated: GEMM peak {hw.peak_tflops * 1e3:.0f} GFLOP/s per process (all busy), "
          f"{hw.alone['peak_tflops'] * 1e3:.0f} alone")
    print(f"{'layout':<12} {'measured s':>10} {'predicted s':>11} {'ratio':>6}   predicted breakdown")
    ratios = {}
    for label, layout in LAYOUTS:
        world = layout.tp * layout.pp * layout.dp
        measured = _run(layout, steps) if world == 1 else run_on_ranks(_run, world, layout, steps, timeout=600)[0]
        pred = predict(_tiny(layout, steps), layout, hw, 0)
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in pred.time.items() if k != "total" and v)
        total = pred.time["total"]
        ratios[label] = total / measured
        print(f"{label:<12} {measured:10.4f} {total:11.4f} {ratios[label]:6.2f}   {parts} ms", flush=True)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"tiny config, micro-batch 8 (dp=2: 4), 4 micro-batches per step, {args.steps} steps, "
          f"{args.rounds} rounds")
    rounds = []
    for i in range(args.rounds):
        print(f"\nround {i + 1}")
        rounds.append(_round(args.steps))
    print(f"\n{'layout':<12} {'predicted / measured':>20}  (median of {args.rounds} rounds; goal 0.85-1.15)")
    for label, _ in LAYOUTS:
        print(f"{label:<12} {statistics.median(r[label] for r in rounds):20.2f}  "
              f"(rounds: {', '.join(f'{r[label]:.2f}' for r in rounds)})")


if __name__ == "__main__":
    main()
