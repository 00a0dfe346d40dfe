"""Our tensor-parallel LLaMA against the same model parallelised by PyTorch's own tensor parallelism.

    python -m benchmarks.vs_torch_tp [--dim 512 --layers 4 --heads 8 --vocab 4096 --batch 4 --seq 256 --steps 16]

Two CPU processes over gloo, tp=2, fp32, one thread per rank. A step is forward + backward into
complete gradients, no optimizer (gradients are dropped before each step, outside the timing).

    ours    llama.model.Transformer with TensorParallel(sp=False / True): Megatron column/row layers,
            vocab-parallel embedding, output layer and cross-entropy (logits are never gathered),
            gradients into the trainer's buckets (parallel.data_parallel.GradBuckets, dp=1): the
            weight-gradient GEMMs write into them, and under sp the norms' partial gradients are
            summed across tp in one all-reduce. Under sp two ways: Megatron's (column layers keep
            their input shard and all-gather it again in backward: less memory), and
            keep_gathered=True (they keep the gathered input, as torch's tensor parallelism does:
            the same activation memory as the torch side, one all-gather fewer).
    torch   transformers' LlamaForCausalLM with the same weights, parallelised with
            torch.distributed.tensor.parallel.parallelize_module the way torchtitan does Llama:
            q/k/v, gate/up ColwiseParallel; o_proj, down_proj RowwiseParallel; embed_tokens
            RowwiseParallel (vocab-sharded); lm_head ColwiseParallel with output_layouts=Replicate
            (logits all-gathered, then plain F.cross_entropy; torchtitan's loss_parallel is not used).
            With sp: SequenceParallel on the norms, PrepareModuleInput (Shard(1) -> Replicate) on
            self_attn (its hidden_states kwarg) and mlp, row layers and the embedding output Shard(1).
            position_ids are passed explicitly, as transformers would otherwise take the sequence length
            from the sequence-sharded embedding output.

Both run in the same processes, steps interleaved (which goes first alternates) after a barrier, so
machine noise hits both; one warm-up step each, whose losses must agree (the same model), then
--steps rounds on rank 0. The ratio is the median of the per-round ratios ours / torch
(`benchmarks.timing`; target <= 0.8).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.timing import interleaved, medians, paired_ratio, spread
from benchmarks.vs_transformers import add_model_arguments, hf_model, model_config
from llama.config import LlamaConfig
from llama.model import Transformer
from parallel.data_parallel import GradBuckets
from parallel.layers import TensorParallel
from parallel.params import init_parameters
from tests.distributed import run_on_ranks, topology

TP = 2


def parallelize_hf(model, mesh, sp: bool):
    """torchtitan's Llama tp plan (with sp: its sequence-parallel plan) on transformers' module names."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    seq = Shard(1) if sp else Replicate()  # the layout of the residual stream between layers
    top = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
           "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Replicate())}
    if sp:
        top["model.norm"] = SequenceParallel()
    parallelize_module(model, mesh, top)
    for layer in model.model.layers:
        plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=seq)}
        if sp:
            plan |= {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                     "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                                     desired_input_kwarg_layouts={"hidden_states": Replicate()}),
                     "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))}
        parallelize_module(layer, mesh, plan)
    return model


def _compare(cfg: LlamaConfig, sp: bool, keep: bool, batch: int, seq: int, steps: int):
    from torch.distributed.device_mesh import init_device_mesh
    group = topology(tp=TP).tp_group
    ours = Transformer(cfg, tp=TensorParallel(group, sp=sp, keep_gathered=keep), attention="sdpa")
    init_parameters(ours, 0)
    buckets = GradBuckets(list(ours.parameters()), None, tp_group=group)
    full = Transformer(cfg, attention="sdpa")  # the same logical weights, unsharded, for transformers
    init_parameters(full, 0)
    theirs = parallelize_hf(hf_model(cfg, full, torch.float32), init_device_mesh("cpu", (TP,)), sp)
    del full
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(seq).unsqueeze(0)

    def our_step():
        buckets.start_step(1)
        loss = ours(x, y)
        loss.backward()
        buckets.finish()
        return loss.item()

    def their_step():
        logits = theirs(input_ids=x, position_ids=positions).logits
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), y.reshape(-1))
        loss.backward()
        return loss.item()

    losses = {"ours": our_step(), "torch": their_step()}  # warm-up; the same model gives the same loss

    def before():  # untimed: drop the gradients, line the ranks up
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        torch.distributed.barrier(group)

    times = interleaved({"ours": our_step, "torch": their_step}, steps, before)
    return medians(times), (paired_ratio(times, "ours", "torch"), spread(times, "ours", "torch")), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, layers=4, vocab=4096, steps=16)
    args = parser.parse_args()
    if args.seq % TP:
        parser.error(f"--seq must be divisible by tp={TP} (sequence parallelism shards it)")
    cfg = model_config(args)
    print(f"LLaMA dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} vocab={cfg.vocab_size} "
          f"({cfg.num_params() / 1e6:.1f}M params), batch {args.batch}x{args.seq}, fp32, tp={TP} on gloo "
          f"(2 CPU processes, 1 thread each); forward+backward, no optimizer; median of {args.steps} steps")
    print("torch = transformers LlamaForCausalLM + torch.distributed.tensor.parallel (torchtitan's plan)")
    print(f"{'sp':>10} {'loss ours':>10} {'loss torch':>10} {'|diff|':>7} {'ours (s)':>9} {'torch (s)':>9} "
          f"{'ours tok/s':>10} {'torch tok/s':>11} {'ours/torch':>10} {'middle half':>11}")
    tokens = args.batch * args.seq
    for sp, keep in ((False, False), (True, False), (True, True)):
        t, (ratio, middle), loss = run_on_ranks(_compare, TP, cfg, sp, keep, args.batch, args.seq, args.steps,
                                                timeout=600)[0]
        diff = abs(loss['ours'] - loss['torch'])
        label = "keep" if keep else str(sp)
        print(f"{label:>10} {loss['ours']:>10.5f} {loss['torch']:>10.5f} {diff:>7.0e} "
              f"{t['ours']:>9.3f} {t['torch']:>9.3f} {tokens / t['ours']:>10.0f} {tokens / t['torch']:>11.0f} "
              f"{ratio:>10.3f} {middle:>11}")
        if diff > 1e-4:
            print(f"WARNING: the first-step losses differ by {diff:.1e}: not the same model")
    print("sp keep: ours keeps the gathered input (TensorParallel(keep_gathered=True)), as torch does")
    print("target: ours/torch <= 0.8")


if __name__ == "__main__":
    main()
