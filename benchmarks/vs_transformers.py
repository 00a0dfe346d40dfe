"""One CPU process: a training step (forward, backward, AdamW) of our LLaMA against transformers'
LlamaForCausalLM with the same config, weights, batch, dtype and thread count.

    python -m benchmarks.vs_transformers [--dim 512 --layers 8 --batch 4 --seq 256 --steps 20]

Both models run in this process, steps interleaved, so machine noise hits both; the table
shows the median step times and the median of the per-round ratios ours / theirs
(`benchmarks.timing`; target ≤ 0.85). Both sides take the paper's training step: forward,
backward, gradient clipping at global norm 1.0, AdamW. Ours is the trainer's step: gradients
into fp32 buckets, AdamW on fp32 master weights (in fp32 the parameters are their own masters).
Theirs is what transformers' Trainer runs: clip_grad_norm_ (its default max_grad_norm=1.0) and
fused AdamW on the module; in bf16 two ways: `amp`, how transformers' Trainer trains in bf16 (fp32 parameters,
autocast to bf16: the same mixed precision as ours), and `pure` (bf16 parameters and AdamW
state: cheaper, but it loses small updates, which is why nobody trains LLMs that way).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.timing import interleaved, medians, paired_ratio, spread
from llama.config import LlamaConfig
from llama.formats import hf_config, is_rotary, permute_to_hf, to_hf_name
from llama.model import Transformer
from parallel.data_parallel import GradBuckets
from parallel.optimizer import Optimizer
from parallel.params import init_parameters
from parallel.topology import build_topology


def hf_model(cfg: LlamaConfig, ours: Transformer, dtype):
    """transformers' LlamaForCausalLM with our weights (q/k rows permuted to its convention)."""
    import transformers
    config = transformers.LlamaConfig(**hf_config(cfg))  # what llama-convert writes as config.json
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).to(dtype)
    state = {to_hf_name(n): (permute_to_hf(p.detach(), cfg.head_dim) if is_rotary(n) else p.detach()).clone()
             for n, p in ours.named_parameters()}
    model.load_state_dict(state, strict=True)
    return model.train()


def add_model_arguments(parser: argparse.ArgumentParser, layers: int, vocab: int, steps: int) -> None:
    """The model and batch options the side-by-side benchmarks share (see `model_config`)."""
    for flag, default in (("--dim", 512), ("--layers", layers), ("--heads", 8), ("--vocab", vocab),
                          ("--batch", 4), ("--seq", 256), ("--steps", steps)):
        parser.add_argument(flag, type=int, default=default)


def model_config(args) -> LlamaConfig:
    return LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                       multiple_of=64, max_seq_len=args.seq)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


def time_split(step, rounds: int = 4) -> dict[str, float]:
    """Seconds per step in GEMMs, in the attention kernels and in everything else (profiler self times)."""
    from torch.profiler import profile
    with profile() as prof:
        for _ in range(rounds):
            step()
    split = {"GEMM": 0.0, "attention": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        kind = ("GEMM" if event.key in GEMM_OPS else
                "attention" if "scaled_dot_product" in event.key else "rest")
        split[kind] += event.self_cpu_time_total / 1e6 / rounds
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, layers=8, vocab=8192, steps=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--hf-bf16", choices=["amp", "pure"], default="amp",
                        help="how transformers trains in bf16 (see above)")
    parser.add_argument("--profile", action="store_true",
                        help="also split each side's step into GEMM, attention and the rest (torch.profiler)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = model_config(args)
    ours = Transformer(cfg, attention="sdpa", dtype=dtype)
    init_parameters(ours, 0)
    amp = dtype == torch.bfloat16 and args.hf_bf16 == "amp"
    theirs = hf_model(cfg, ours, torch.float32 if amp else dtype)
    buckets = GradBuckets(list(ours.parameters()), None)
    our_opt = Optimizer(buckets, build_topology(), lr=1e-4, grad_clip=1.0)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def our_step():
        buckets.start_step(1)
        loss = ours(x, y)
        loss.backward()
        our_opt.step(1e-4)
        return loss.item()

    def their_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = theirs(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, foreach=True)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        return loss.item()

    first = (our_step(), their_step())  # warm-up, and the same loss from the same weights
    times = interleaved({"ours": our_step, "transformers": their_step}, args.steps)
    med, ratio = medians(times), paired_ratio(times, "ours", "transformers")
    print(f"LLaMA dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} vocab={cfg.vocab_size} "
          f"({cfg.num_params() / 1e6:.1f}M params), batch {args.batch}x{args.seq}, {args.dtype}, "
          f"{args.threads} threads, median of {args.steps} steps"
          + (f"; transformers in bf16 {'AMP' if amp else 'pure'}" if dtype == torch.bfloat16 else ""))
    print(f"first-step loss: ours {first[0]:.5f}, transformers {first[1]:.5f}")
    print(f"{'':>14} {'step (s)':>9} {'tokens/s':>9}")
    for k, v in med.items():
        print(f"{k:>14} {v:>9.3f} {args.batch * args.seq / v:>9.0f}")
    print(f"ratio ours / transformers (median of per-round ratios): {ratio:.3f}, middle half "
          f"{spread(times, 'ours', 'transformers')} (target <= 0.85)")
    if args.profile:  # where the time goes; both sides run the same GEMM shapes and attention kernel
        split = {"ours": time_split(our_step), "transformers": time_split(their_step)}
        print(f"{'profiled (s/step)':>18} {'GEMM':>7} {'attention':>9} {'rest':>7} {'total':>7}")
        for k, v in split.items():
            print(f"{k:>18} {v['GEMM']:>7.3f} {v['attention']:>9.3f} {v['rest']:>7.3f} {sum(v.values()):>7.3f}")
        floor = (split["ours"]["GEMM"] + split["ours"]["attention"]) / sum(split["transformers"].values())
        print(f"ours' GEMMs and attention alone take {floor:.2f} of transformers' whole step")


if __name__ == "__main__":
    main()
