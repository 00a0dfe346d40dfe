"""Activation memory per transformer layer, measured, against Korthikanti et al.'s accounting
adapted to LLaMA's layer (pre-RMSNorm, rotary attention, SwiGLU, no dropout, flash attention).

    python -m benchmarks.activation_memory [--dim 256 --seq 256 --batch 2] [--kv-heads 2]

Measured: bytes a bf16 forward pass leaves alive for backward (parallel.memory.SavedActivationMemory),
for a 2-layer minus a 1-layer model, so one layer's share; at tp=1, and at tp=2 with and without
sequence parallelism (per rank), and with sp keeping the column layers' gathered input
(`TensorParallel(keep_gathered=True)`, torch's tensor parallelism's choice).

Formula, in bytes, with E = s·b·h and F = s·b·f elements (f the FFN width, 8h/3 rounded), a heads,
t = tp, and r = t under sequence parallelism else 1 (what only sp divides):

  none        8E/r   two RMSNorms, each keeping its input (2) and the per-token 1/rms, its
                     output kept by the next matmul (2)
           + 8E/t    q and k after RoPE, v, the attention output (2 each); RoPE keeps nothing
                     but its tables (its backward is the inverse rotation)
           + 6F/t    w1·x and w3·x (kept by SwiGLU, which recomputes silu) and their product (2 each)
           + 4asb/t  the attention kernel's log-sum-exp (fp32)
           + 8sb/r   the norms' 1/rms (fp32)
  selective  2E/r    the layer input, then only matmul and attention outputs (the paper's choice):
           + 8E/t    q, k, v before RoPE and the attention output (k and v are a fraction
                     max(kv, t)/a of q's width under grouped-query attention: 4E/t + 4E·max(kv, t)/(a·t))
           + 4E      wo's and w2's outputs: partial sums of the full width before the tp reduction
           + 4F/t    w1·x and w3·x
           + 4asb/t
  full       2E/r    the layer input

With sp and keep_gathered, the norms' outputs are kept all-gathered: 8E/r becomes 4E/r + 4E without
recompute; with recompute the gathered inputs are recomputed, and nothing changes.

In Korthikanti's units (bytes / sbh, f = 8h/3): none ≈ 8/r + 24/t, selective ≈ 2/r + 4 + 18.7/t,
full 2/r; their GPT layer (dropout, 4h GELU MLP, no flash attention) is 10 + 24/t + 5as/(ht) without
sp and 34/t + 5as/(ht) with it.
"""
from __future__ import annotations

import argparse
import gc

import torch

from llama.config import LlamaConfig
from llama.memory_estimate import activation_bytes_per_layer
from llama.model import Transformer
from parallel.layers import TensorParallel
from parallel.memory import SavedActivationMemory
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology


def _layer_bytes(cfg_kwargs, mode, batch, seq, dtype, tp_size=1, sp=False, keep=False):
    tp = TensorParallel(topology(tp=tp_size).tp_group, sp=sp, keep_gathered=keep) if tp_size > 1 else TensorParallel()
    out = []
    for layers in (1, 2):
        cfg = LlamaConfig(n_layers=layers, **cfg_kwargs)
        model = Transformer(cfg, tp=tp, attention="sdpa", recompute=mode, dtype=dtype)
        init_parameters(model, 0)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        watch = SavedActivationMemory()
        with watch:
            loss = model(tokens, tokens)
        gc.collect()
        out.append(watch.live_bytes(exclude=[*model.parameters(), *model.buffers(), tokens, loss]))
        loss.backward()
    return out[1] - out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, help="grouped-query attention (default: --heads)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    dtype = torch.bfloat16
    kw = dict(dim=args.dim, n_heads=args.heads, n_kv_heads=args.kv_heads, vocab_size=512, multiple_of=64,
              max_seq_len=args.seq)
    f = LlamaConfig(**kw).ffn_dim
    s, b, h, a = args.seq, args.batch, args.dim, args.heads
    kv = args.kv_heads or a
    print(f"one LLaMA layer: s={s} b={b} h={h} a={a} kv heads={kv} f={f}, bf16; bytes kept for backward per rank")
    print(f"{'layout':>12} {'recompute':>10} {'measured':>10} {'formula':>10} {'ratio':>6} {'× sbh':>6}")
    for tp_size, sp, keep in ((1, False, False), (2, False, False), (2, True, False), (2, True, True)):
        for mode in ("none", "selective", "full"):
            if tp_size == 1:
                got = _layer_bytes(kw, mode, b, s, dtype)
            else:
                got = run_on_ranks(_layer_bytes, 2, kw, mode, b, s, dtype, tp_size, sp, keep)[0]
            want = activation_bytes_per_layer(mode, s, b, h, f, a, tp_size, sp, keep, kv)
            layout = f"tp={tp_size}" + ("+sp" if sp else "") + (" keep" if keep else "")
            print(f"{layout:>12} {mode:>10} {got:>10,} {want:>10,.0f} {got / want:>6.2f} "
                  f"{got / (s * b * h):>6.1f}")


if __name__ == "__main__":
    main()
