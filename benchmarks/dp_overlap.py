"""Data-parallel step time with the bucket reductions overlapped with backward, and without.

    python -m benchmarks.dp_overlap [--dp 2] [--steps 10]

Both settings train the same model in the same processes, alternating, so noise hits both; the ratio is the
median of the per-round ratios (`benchmarks.timing`).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.timing import interleaved, medians, paired_ratio
from llama.config import LlamaConfig
from llama.model import Transformer
from parallel.data_parallel import GradBuckets
from parallel.optimizer import Optimizer
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology

CFG = LlamaConfig(dim=512, n_layers=4, n_heads=8, vocab_size=2048, multiple_of=64, max_seq_len=256)


def _time(steps: int, bucket_mb: float):
    topo = topology()
    runs = {}
    for overlap in (True, False):
        model = Transformer(CFG, attention="sdpa")
        init_parameters(model, 0)
        buckets = GradBuckets(list(model.parameters()), topo.dp_group, bucket_mb, overlap=overlap)
        runs[overlap] = (model, buckets, Optimizer(buckets, topo, 1e-4))
    tokens = torch.randint(0, CFG.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    def step(overlap):
        model, buckets, opt = runs[overlap]
        buckets.start_step(1)
        model(tokens, tokens).backward()
        opt.step(1e-4)

    times = interleaved({"on": lambda: step(True), "off": lambda: step(False)}, steps, torch.distributed.barrier)
    return medians(times), paired_ratio(times, "on", "off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    args = parser.parse_args()
    t, ratio = run_on_ranks(_time, args.dp, args.steps, args.bucket_mb, timeout=600)[0]
    print(f"LLaMA dim={CFG.dim} layers={CFG.n_layers} ({CFG.num_params() / 1e6:.1f}M params), batch 4x256 per rank, "
          f"dp={args.dp}, buckets of {args.bucket_mb} MB, gloo on CPU; median step of {args.steps}")
    print(f"overlap on {t['on']:.3f} s, off {t['off']:.3f} s, on/off {ratio:.3f}")


if __name__ == "__main__":
    main()
