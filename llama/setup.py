"""A rank's set-up, shared by the trainer, the dry run and the planner: the checks a run must
pass before anything is built, what each rank builds (model chunks, gradient buckets, optimizer,
pipeline links), and the memory that set-up predicts. On the meta device (the dry run, the
planner) every tensor has its real shape and no storage, so the figures are those of the job.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llama.config import ConfigError, RunConfig
from llama.memory_estimate import activation_bytes
from llama.model import check_tensor_parallel
from llama.parallelize import activation_shape, build_chunks
from parallel.data_parallel import GradBuckets
from parallel.optimizer import Optimizer
from parallel.pipeline.p2p import PipelineP2P
from parallel.pipeline.partition import chunk_sizes
from parallel.pipeline.schedules import check_schedule
from parallel.topology import node_crossing_message, tp_groups_crossing_nodes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_batch(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches per step on each rank: global = micro-batch × accumulation × dp."""
    if global_batch % (micro_batch * dp):
        raise ConfigError(f"global_batch={global_batch} is not divisible by micro_batch*dp={micro_batch}*{dp}: "
                          "the global batch is micro-batch x accumulation steps x dp")
    return global_batch // (micro_batch * dp)


def check_run(run: RunConfig, topo) -> int:
    """Every check a run passes before building anything (one line naming the value and the
    rule otherwise); returns the micro-batches per step on each rank (the accumulation)."""
    m, t = run.model, run.train
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    accumulation = check_batch(t.global_batch, t.micro_batch, topo.dp)
    check_tensor_parallel(m, topo.tp, t.sp, t.seq_len, ranks=topo.world // topo.pp)
    check_schedule(t.schedule, accumulation, topo.pp, t.vpp)
    chunk_sizes(m.n_layers, topo.pp, t.vpp, t.stage_layers)  # the split, checked on every rank
    return accumulation


def decays(p) -> bool:
    """Weight decay on matrices only (linear and embedding weights), none on RMSNorm gains: the
    choice of Megatron-LM and GPT-NeoX, since decay pulls a gain towards 0, not towards 1."""
    return p.dim() >= 2


@dataclass
class RankSetup:
    """What one rank holds before its first step."""
    chunks: list            # its model chunks (Transformer stages), in the order it runs them
    params: list            # their parameters, as the gradient buckets hold them
    buckets: GradBuckets
    optimizer: Optimizer
    p2p: PipelineP2P
    shape: tuple[int, int, int]  # the activation crossing between pipeline stages
    accumulation: int       # micro-batches per step


def build_rank(run: RunConfig, topo, device, seed: int | None | str = "config") -> RankSetup:
    """Check the run, then build this rank's part of it on `device`. `seed`: the initialisation
    ("config": the run's train.seed; None: none, as on the meta device, where there is nothing
    to initialise)."""
    m, t = run.model, run.train
    accumulation = check_run(run, topo)
    seed = t.seed if seed == "config" else seed
    chunks = build_chunks(m, topo, sp=t.sp, sp_keep_gathered=t.sp_keep_gathered, vpp=t.vpp,
                          stage_layers=t.stage_layers, seed=seed, attention=t.attention, recompute=t.recompute,
                          vocab_pad_multiple=t.vocab_pad_multiple, device=device, dtype=DTYPES[t.dtype])
    params = [p for c in chunks for p in c.parameters()]
    buckets = GradBuckets(params, topo.dp_group, t.bucket_mb, reduce_scatter=t.distributed_optimizer,
                          overlap=t.overlap_grad_reduce, decays=decays, tp_group=topo.tp_group)
    optimizer = Optimizer(buckets, topo, t.lr, (t.beta1, t.beta2), weight_decay=t.weight_decay,
                          grad_clip=t.grad_clip, distributed=t.distributed_optimizer,
                          overlap_param_gather=t.overlap_param_gather)
    optimizer.wait_before_forward(chunks)
    p2p = PipelineP2P(topo, ring=t.vpp > 1)
    shape = activation_shape(m, t.micro_batch, t.seq_len, topo.tp, t.sp)
    return RankSetup(chunks, params, buckets, optimizer, p2p, shape, accumulation)


def memory_breakdown(run: RunConfig, topo, setup: RankSetup) -> dict[str, int]:
    """Bytes this rank holds: weights, gradient buckets and optimizer state as allocated (their
    real tensors, on any device), activations predicted (llama.memory_estimate), and the total."""
    layers = sum(len(c.layers) for c in setup.chunks)
    mem = {"weights": sum(p.numel() * p.element_size() for p in setup.params),
           "gradients": sum(b.grad.numel() * b.grad.element_size() for b in setup.buckets.buckets),
           "optimizer": setup.optimizer.state_bytes(),
           "activations": round(activation_bytes(run.model, run.train, topo.tp, topo.pp, topo.pp_rank, layers,
                                                 setup.accumulation))}
    mem["total"] = sum(mem.values())
    return mem


def human_bytes(n: float) -> str:
    """1536 → '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def slurm_tasks_per_node(env=None) -> int | None:
    """Tasks on the first node of a SLURM job (SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE
    like '8(x256)'), or None outside SLURM. Ranks fill nodes in blocks of this many (SLURM's
    block distribution), which is how our rank order puts a tp group on one node."""
    from launcher.env import _tasks_per_node
    env = os.environ if env is None else env
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    try:
        return _tasks_per_node(spec, 0) if spec else None
    except ValueError:
        return None


def tp_node_warning(topo, env=None) -> str | None:
    """The warning the trainer prints under SLURM when some tp groups span nodes, else None."""
    per_node = slurm_tasks_per_node(env)
    if per_node is None or topo.tp == 1:
        return None
    groups = tp_groups_crossing_nodes(topo.tp, topo.world, per_node)
    return node_crossing_message(groups, topo.tp, per_node) if groups else None
