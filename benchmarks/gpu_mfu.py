"""MFU on one GPU: a ~1.3B LLaMA (dim 2048, 24 layers, 16 heads, seq 2048, bf16) trained with
the trainer's step (fp32 gradient buckets, AdamW on fp32 masters), beside a large bf16 matmul
measured in the same run as the practical ceiling.

    python -m benchmarks.gpu_mfu [--micro-batch 4 --steps 10 --peak-tflops 989]

MFU = (6·N + 12·L·s·d) · tokens/s ÷ peak (llama/metrics.py). Rows: attention sdpa and xformers
(when its kernels load), selective recompute on and off. Without a CUDA device it says so and
exits 0 (the CPU has no meaningful MFU).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from llama.attention import xformers_unavailable_reason
from llama.config import LlamaConfig
from llama.metrics import device_peak_tflops, flops_per_token
from llama.model import Transformer
from parallel.data_parallel import GradBuckets
from parallel.optimizer import Optimizer
from parallel.params import init_parameters
from parallel.topology import build_topology


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12


def train_tokens_per_s(cfg: LlamaConfig, attention: str, recompute: str, micro_batch: int, steps: int):
    torch.cuda.reset_peak_memory_stats()
    model = Transformer(cfg, attention=attention, recompute=recompute, device="cuda", dtype=torch.bfloat16)
    init_parameters(model, 0)
    buckets = GradBuckets(list(model.parameters()), None)
    opt = Optimizer(buckets, build_topology(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.max_seq_len + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            torch.cuda.synchronize()
            start = time.perf_counter()
        buckets.start_step(1)
        model(x, y).backward()
        opt.step(1e-4)
    torch.cuda.synchronize()
    tps = steps * micro_batch * cfg.max_seq_len / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    del model, buckets, opt
    torch.cuda.empty_cache()
    return tps, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense peak; default: known for the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA device here; nothing to measure (run it on a GPU machine)")
        return 0
    peak = args.peak_tflops or device_peak_tflops()
    if not peak:
        print(f"gpu_mfu: unknown peak for {torch.cuda.get_device_name()}: pass --peak-tflops")
        return 2
    cfg = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=32000,
                      max_seq_len=args.seq)
    ceiling = matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: peak {peak:.0f} TFLOP/s (bf16 dense), 8192³ bf16 matmul "
          f"{ceiling:.0f} TFLOP/s = {ceiling / peak:.1%} of peak (the practical ceiling)")
    print(f"LLaMA dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} seq={cfg.max_seq_len} "
          f"({cfg.num_params() / 1e9:.2f}B params), micro-batch {args.micro_batch}, bf16, fp32 masters; "
          f"{flops_per_token(cfg, cfg.max_seq_len) / 1e9:.1f} GFLOP/token")
    print(f"{'attention':>10} {'recompute':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'of ceiling':>10} "
          f"{'peak mem':>9}")
    backends = ["sdpa"] + ([] if xformers_unavailable_reason("cuda") else ["xformers"])
    for attention in backends:
        for recompute in ("none", "selective"):
            try:
                tps, mem = train_tokens_per_s(cfg, attention, recompute, args.micro_batch, args.steps)
            except torch.cuda.OutOfMemoryError:
                print(f"{attention:>10} {recompute:>10} {'out of memory':>10}")
                torch.cuda.empty_cache()
                continue
            tflops = flops_per_token(cfg, cfg.max_seq_len) * tps / 1e12
            print(f"{attention:>10} {recompute:>10} {tps:>10,.0f} {tflops:>8.0f} {tflops / peak:>6.1%} "
                  f"{tflops / ceiling:>10.1%} {mem / 2**30:>8.1f}G")
    if "xformers" not in backends:
        print(f"xformers: {xformers_unavailable_reason('cuda')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
