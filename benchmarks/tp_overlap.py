"""Step time of a tensor-parallel LLaMA with the backward overlap on and off, and their ratio.

    python -m benchmarks.tp_overlap [--tp 2] [--steps 12]

Both settings run in the same processes, interleaved step by step, so machine noise hits both.
Overlap: a column layer's input-gradient collective runs while its weight-gradient GEMM computes
(and under sp the input re-gather while the input-gradient GEMM computes).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.timing import interleaved, medians, paired_ratio
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
    steps_by_name = {name: (lambda m=models[overlap]: m(tokens, tokens).backward())
                     for name, overlap in (("on", True), ("off", False))}
    times = interleaved(steps_by_name, steps, lambda: torch.distributed.barrier(group))
    return medians(times), paired_ratio(times, "on", "off")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    print(f"LLaMA dim={CFG.dim} layers={CFG.n_layers} batch={args.batch} seq={args.seq}, tp={args.tp} on gloo (CPU), "
          f"median forward+backward of {args.steps} steps")
    print(f"{'sp':>5} {'overlap on (s)':>15} {'overlap off (s)':>16} {'on/off':>8}")
    for sp in (False, True):
        t, ratio = run_on_ranks(_time_steps, args.tp, args.tp, sp, args.steps, args.batch, args.seq, timeout=600)[0]
        print(f"{str(sp):>5} {t['on']:>15.3f} {t['off']:>16.3f} {ratio:>8.3f}")


if __name__ == "__main__":
    main()
