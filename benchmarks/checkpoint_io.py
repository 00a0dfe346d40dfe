"""Checkpoint save and load time, and the bytes each rank writes, at 1, 2, 4 and 8 ranks.

    python -m benchmarks.checkpoint_io [--dim 512 --layers 8]

A model of `--dim` and `--layers` (fp32 weights, Adam state) trains one step at dp = ranks
(tp = 2 from 4 ranks) with the distributed optimizer, saves, and loads back. Printed: save and
load seconds (the slowest rank's), the checkpoint's bytes, and the most and least any rank wrote
against bytes / ranks: every rank writes its own share, so the busiest one writes about 1/world.
On one machine the ranks share one disk and two cores, so time does not fall with ranks here;
the bytes per rank are what a parallel file system turns into time.

Then the cost of saving to training, on one process: the time of 12 steps of the same model with
no checkpoint, with one every 2 steps, and with one every 2 steps under `--async-save` (the last
save of a run is written before it returns in both).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llama.config import load_config
from tests.distributed import run_on_ranks, topology


def _run(dim: int, layers: int, tp: int, dp: int):
    run = load_config("tiny")
    model = dataclasses.replace(run.model, dim=dim, n_heads=max(4, dim // 64), n_layers=layers, vocab_size=4096)
    run = dataclasses.replace(run, model=model, data=dataclasses.replace(run.data, sources=[], tokenizer=""))
    t = run.train
    t.tp, t.dp, t.distributed_optimizer, t.steps, t.micro_batch, t.global_batch = tp, dp, dp > 1, 1, 1, 8
    t.seq_len = 64
    return run


def _rank(root: str, dim: int, layers: int, tp: int, dp: int) -> tuple[float, float, int]:
    from llama.train import ByteDemoData, train
    from parallel.checkpoint import load_checkpoint, save_checkpoint
    torch.set_num_threads(1)
    run = _run(dim, layers, tp, dp)
    topo = topology(tp, 1, dp)
    result = train(run, topo, show_progress=False, data=ByteDemoData(run.train.seq_len, 0))
    if topo.world > 1:
        dist.barrier()
    start = time.perf_counter()
    path = save_checkpoint(root, 1, result.chunks, result.optimizer, topo, meta={"consumed_samples": 8})
    save_s = time.perf_counter() - start
    if topo.world > 1:
        dist.barrier()
    start = time.perf_counter()
    load_checkpoint(path, result.chunks, result.optimizer, topo)
    load_s = time.perf_counter() - start
    mine = Path(path) / "shards" / f"rank{topo.rank:05d}.safetensors"
    return save_s, load_s, mine.stat().st_size if mine.is_file() else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    print(f"model dim {args.dim}, {args.layers} layers, fp32 weights + Adam state (distributed optimizer from dp 2)")
    print(f"{'ranks':>5} {'layout':>10} {'save s':>7} {'load s':>7} {'total MiB':>10} {'most/rank':>10} "
          f"{'least/rank':>10} {'most / (total/ranks)':>20}")
    for ranks in (1, 2, 4, 8):
        tp = 2 if ranks >= 4 else 1
        dp = ranks // tp
        with tempfile.TemporaryDirectory() as root:
            out = run_on_ranks(_rank, ranks, root, args.dim, args.layers, tp, dp, timeout=900) if ranks > 1 \
                else [_rank(root, args.dim, args.layers, tp, dp)]
        sizes = [b for _, _, b in out]
        total = sum(sizes)
        print(f"{ranks:>5} {f'tp{tp} dp{dp}':>10} {max(s for s, _, _ in out):7.2f} {max(ld for _, ld, _ in out):7.2f} "
              f"{total / 2**20:10.1f} {max(sizes) / 2**20:10.2f} {min(sizes) / 2**20:10.2f} "
              f"{max(sizes) / (total / ranks):20.2f}", flush=True)
    slowdown(args.dim, args.layers)


def _wall(root: str, dim: int, layers: int, every: int, async_save: bool) -> float:
    """Seconds of train() for 12 steps (a step's own time excludes its save: this does not)."""
    import os

    from llama.train import ByteDemoData, CheckpointOptions, train
    from parallel.topology import build_topology
    torch.set_num_threads(1)
    run = _run(dim, layers, 1, 1)
    run.train.steps, run.train.log_every = 12, 1000
    ckpt = CheckpointOptions(os.path.join(root, f"c-{every}-{async_save}") if every else None, save_every=every,
                             keep=2, async_save=async_save)
    data = ByteDemoData(run.train.seq_len, 0)
    start = time.perf_counter()
    train(run, build_topology(), show_progress=False, ckpt=ckpt, data=data)
    return time.perf_counter() - start


def slowdown(dim: int, layers: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        base = min(_wall(root, dim, layers, 0, False) for _ in range(2))
        print(f"\none process, 12 steps: {base:.2f} s without checkpoints (best of 2)")
        for label, async_save in (("a checkpoint every 2 steps", False), ("the same with --async-save", True)):
            wall = min(_wall(root, dim, layers, 2, async_save) for _ in range(2))
            print(f"  {label:<30} {wall:.2f} s ({wall / base:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
