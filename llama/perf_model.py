"""Predicted memory and step time of one layout on given hardware: the planner's model.

Memory per GPU is the trainer's own set-up built on the meta device for the pipeline's first and
last ranks (`llama.setup.build_rank` inside a fake process group of the job's world size): the
real weights, gradient buckets and optimizer state, the activations of `llama.memory_estimate`
(per-layer accounting verified by `benchmarks/activation_memory.py`, times the micro-batches the
schedule keeps in flight), the logits the last stage keeps for the loss, and the working set of one
backward (the gradients in flight, a recomputed layer's activations, the logits' gradient): these two
are measured on the meta device by `llama.step_profile`, which runs the real layer and loss.

Step time, for the slowest pipeline rank (`llama.step_profile` counts its work on the real model):

  compute      per micro-batch: matmul FLOPs at the GEMM rate, attention FLOPs at the attention
               rate, other kernels' bytes at memory bandwidth, one launch cost per kernel, and in
               bf16 the fp32 gradient accumulation (read 2 B, read and write 4 B per parameter);
  tp comm      every tp collective the layer issues (counted, not assumed), ring bytes over NVLink
               (over the network if the tp group spans nodes); the backward's input-gradient
               reductions and sp re-gathers of the column layers are hidden behind that layer's
               GEMMs, as parallel/layers.py overlaps them; the rest is exposed;
  pp p2p       per micro-batch and chunk, one activation forward and one gradient back, exposed;
  bubble       one micro-batch of every stage but the slowest, over vpp, on top of the slowest's
               m micro-batches (1F1B's critical path; balanced: (pp-1)/vpp, Narayanan et al. 2021);
  dp comm      the gradient buckets' all-reduce (ZeRO-1: reduce-scatter, then the parameters'
               all-gather); the reduction overlaps the last micro-batch's backward, the all-gather
               after the optimizer is exposed;
  optimizer    AdamW over the parameters this rank owns: 34 bytes each at memory bandwidth.

What it leaves out: stragglers and jitter between 2048 GPUs, network congestion and topology
beyond one link per GPU, kernels that fuse elementwise work (it counts eager kernels), data
loading, and the interaction of overlapped communication with compute (contention for SMs and
memory bandwidth). RESULTS.md section 11 compares it with the paper's run.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from llama.config import RunConfig
from llama.hardware import Hardware
from llama.memory_estimate import activation_bytes
from llama.metrics import flops_per_token
from llama.setup import DTYPES
from llama.step_profile import Work, profile
from parallel import comm
from parallel.pipeline.partition import chunks_of_rank
from parallel.topology import tp_groups_crossing_nodes

# The paper's carbon formula (section 6, Table 15): Wh = GPU-hours × power × PUE; tCO2eq = MWh × 0.385.
PUE = 1.1
TCO2_PER_MWH = 0.385
ADAM_BYTES_PER_PARAM = 34  # read grad, master, m, v (16); write master, m, v (12), param (2); the norm's read (4)


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    vpp: int = 1
    micro_batch: int = 1
    sp: bool = False
    recompute: str = "selective"
    distributed_optimizer: bool = False

    @property
    def schedule(self) -> str:
        return "interleaved" if self.vpp > 1 else "1f1b"

    def apply(self, run: RunConfig) -> RunConfig:
        """`run` with this layout in its train section."""
        train = dataclasses.replace(run.train, tp=self.tp, pp=self.pp, dp=self.dp, vpp=self.vpp,
                                    micro_batch=self.micro_batch, sp=self.sp and self.tp > 1, recompute=self.recompute,
                                    distributed_optimizer=self.distributed_optimizer, schedule=self.schedule)
        return dataclasses.replace(run, train=train)

    def __str__(self) -> str:
        return (f"tp{self.tp}{'+sp' if self.sp and self.tp > 1 else ''} pp{self.pp}"
                f"{f'x{self.vpp}' if self.vpp > 1 else ''} dp{self.dp} mb{self.micro_batch} "
                f"{self.recompute}{' zero1' if self.distributed_optimizer else ''}")


@dataclass
class Prediction:
    layout: Layout
    memory: dict[str, float]          # bytes per GPU, the fullest rank: weights ... total
    fits: bool
    time: dict[str, float]            # seconds per step: compute ... total
    tokens_per_s_per_gpu: float
    mfu: float
    days: float
    gpu_hours: float
    mwh: float
    tco2eq: float
    params_per_gpu: int = 0
    notes: list[str] = field(default_factory=list)


def carbon(gpu_hours: float, power_w: float) -> tuple[float, float]:
    """(MWh, tCO2eq) with the paper's formula."""
    mwh = gpu_hours * power_w * PUE / 1e6
    return mwh, mwh * TCO2_PER_MWH


@functools.lru_cache(maxsize=1024)
def _static_memory(key: tuple, world: int, pp_rank: int) -> dict:
    """Weights, gradients and optimizer bytes of pp rank `pp_rank` (tp rank 0, dp rank 0): the
    trainer's own set-up on the meta device, in a fake process group of the job's world size."""
    import torch

    from llama.fake_world import fake_world
    from llama.setup import build_rank, memory_breakdown
    from parallel.topology import build_topology
    run = _runs[key]
    t = run.train
    with fake_world(world, pp_rank * t.tp * t.dp), torch.device("meta"):
        topo = build_topology(t.tp, t.pp, t.dp)
        setup = build_rank(run, topo, "meta", seed=None)
        mem = memory_breakdown(run, topo, setup)  # its activations are the key run's: predict() redoes them
        return {"weights": mem["weights"], "gradients": mem["gradients"], "optimizer": mem["optimizer"],
                "params": sum(p.numel() for p in setup.params),
                "layers": sum(len(c.layers) for c in setup.chunks),
                "buckets": len(setup.buckets.buckets),
                "param_bytes_padded": sum(b.data.numel() * b.data.element_size() for b in setup.buckets.buckets)}


_runs: dict[tuple, RunConfig] = {}


def _key(run: RunConfig) -> tuple:
    """What the weights, buckets and optimizer state depend on; the run kept for that key is
    one that passes the set-up's checks (micro-batch, schedule and recompute do not change them)."""
    t = run.train
    key = (run.model.key(), t.tp, t.pp, t.dp, t.vpp, t.dtype, t.distributed_optimizer, t.bucket_mb,
           t.vocab_pad_multiple, tuple(t.stage_layers or ()))
    _runs.setdefault(key, run)
    return key


def accumulation(run: RunConfig) -> int:
    """Micro-batches per step; the run's every check passed first (the trainer's, one line each)."""
    from llama.setup import check_run
    from parallel.topology import Topology
    t = run.train
    return check_run(run, Topology(tp=t.tp, pp=t.pp, dp=t.dp))


def memory(run: RunConfig, world: int, pp_rank: int, device: str = "cuda") -> dict[str, float]:
    """Bytes pp rank `pp_rank` holds at its peak: weights, gradients, optimizer, activations, logits
    and the working set of one backward."""
    m, t = run.model, run.train
    micro_batches = accumulation(run)  # checked before its key can be cached
    static = _static_memory(_key(run), world, pp_rank)
    mem = {k: static[k] for k in ("weights", "gradients", "optimizer")}
    mem["activations"] = activation_bytes(m, t, t.tp, t.pp, pp_rank, static["layers"], micro_batches)
    prof = profile(m, t.tp, t.sp, t.recompute, t.micro_batch, t.seq_len, DTYPES[t.dtype], t.sp_keep_gathered,
                   t.vocab_pad_multiple, device)
    last = pp_rank == t.pp - 1
    # the last stage's forward keeps its logits (and the final norm's input) for the loss's backward
    mem["logits"] = prof["last"].saved_bytes if last else 0
    # the most one backward holds beyond the saved activations: a layer's, or the loss's on the last stage
    mem["working"] = max(prof["layer"].backward_bytes, prof["last"].backward_bytes if last else 0,
                         prof["first"].backward_bytes if pp_rank == 0 else 0)
    mem["total"] = sum(mem.values())
    return {**mem, "_static": static}


def _compute_s(work: Work, hw: Hardware) -> float:
    one_gemm = work.matmul_flops / work.matmuls if work.matmuls else None
    others = work.kernels - work.matmuls
    one_kernel = work.memory_bytes / others if others else None
    return (hw.gemm_s(work.matmul_flops, one_gemm) + hw.attention_s(work.attention_flops)
            + hw.memory_s(work.memory_bytes, one_kernel) + work.kernels * hw.launch_s)


def _tp_comm_s(work: Work, tp: int, hw: Hardware, inter: bool) -> float:
    return sum(hw.link_s(comm.wire_bytes(op, work.collective_bytes[op], tp), calls, inter)
               for op, calls in work.collectives.items())


def predict(run: RunConfig, layout: Layout, hw: Hardware, tokens: float) -> Prediction:
    """Memory and step time of `layout` for `run` (its model, sequence length, global batch)."""
    run = layout.apply(run)
    m, t = run.model, run.train
    world = layout.tp * layout.pp * layout.dp
    hw = hw.on_node(min(world, hw.gpus_per_node))
    dtype = DTYPES[t.dtype]
    elt = dtype.itemsize
    ranks = sorted({0, t.pp - 1})
    mems = {r: memory(run, world, r, hw.device) for r in ranks}
    fullest = max(ranks, key=lambda r: mems[r]["total"])
    prof = profile(m, t.tp, t.sp, t.recompute, t.micro_batch, t.seq_len, dtype, t.sp_keep_gathered,
                   t.vocab_pad_multiple, hw.device)
    per_node = hw.gpus_per_node
    tp_inter = bool(tp_groups_crossing_nodes(t.tp, world, per_node))
    bsh = t.micro_batch * t.seq_len * m.dim * elt
    # Hidden per layer: the column layers' input-gradient reductions (2) and, under sp without the
    # kept input, their re-gathers (2), each at most as long as the backward GEMMs it runs beside.
    n_hidden = (2 + (2 if t.sp and t.tp > 1 and not t.sp_keep_gathered else 0)) if t.tp > 1 else 0
    op = "reduce_scatter" if t.sp and t.tp > 1 else "all_reduce"
    one_hidden = hw.link_s(comm.wire_bytes(op, bsh, t.tp), 1, tp_inter) if t.tp > 1 else 0.0
    layer_bwd_gemm = hw.gemm_s(prof["layer"].matmul_flops * 2 / 3)
    measured = all(o in hw.collective_curve for o in comm.RING_FACTOR) and "p2p" in hw.collective_curve

    per_rank = {}
    layers_of = {r: sum(len(c.layer_ids) for c in chunks_of_rank(m.n_layers, t.pp, r, t.vpp, t.stage_layers))
                 for r in range(t.pp)}
    for r in sorted(set(range(t.pp)) if t.pp <= 64 else {0, 1, t.pp - 2, t.pp - 1}):
        layers = layers_of[r]
        work = prof["layer"].scaled(layers)
        if r == 0:
            work = work + prof["first"]
        if r == t.pp - 1:
            work = work + prof["last"]
        # a middle stage's parameters: the first stage's per layer (its embedding share is small)
        params = mems[r]["_static"]["params"] if r in mems else \
            mems[0]["_static"]["params"] * layers / max(layers_of[0], 1)
        accumulate = params * 10 if dtype.itemsize == 2 else 0  # bf16 grad into fp32 main_grad
        compute = _compute_s(work, hw) + hw.memory_s(accumulate)
        if t.tp == 1:
            tp_exposed = 0.0
        elif measured:  # cpu-local: each call's measured cost, the hidden ones' measured beside a GEMM
            hidden_calls = {op: 2 * layers}
            if n_hidden > 2:
                hidden_calls["all_gather"] = 2 * layers
            tp_exposed = sum(hw.collective_s(o, work.collective_bytes[o] - hidden_calls.get(o, 0) * bsh,
                                             calls - hidden_calls.get(o, 0))
                             + hw.collective_s(o, hidden_calls.get(o, 0) * bsh, hidden_calls.get(o, 0), overlapped=True)
                             for o, calls in work.collectives.items())
        else:
            hidden = layers * min(n_hidden * one_hidden, layer_bwd_gemm)
            tp_exposed = max(_tp_comm_s(work, t.tp, hw, tp_inter) - hidden, 0.0)
        per_rank[r] = (compute, tp_exposed, layers)
    slow = max(per_rank, key=lambda r: per_rank[r][0] + per_rank[r][1])
    compute_mb, tp_mb, layers = per_rank[slow]
    mcount = accumulation(run)

    pp_inter = t.tp * t.dp >= per_node
    act = t.micro_batch * (t.seq_len // t.tp if t.sp and t.tp > 1 else t.seq_len) * m.dim * elt
    one_p2p = hw.collective_s("p2p", act, 1) if measured else hw.link_s(act, 1, pp_inter)
    p2p_mb = 2 * t.vpp * one_p2p if t.pp > 1 else 0.0
    # 1F1B's critical path: m micro-batches on the slowest stage, plus one on every other stage as
    # the pipeline fills and drains (divided by vpp when interleaved); balanced: (pp-1)/vpp of one.
    # Past 64 stages only the ends are profiled: the middle ones are taken to be like stage 1.
    others = sum(per_rank.get(r, per_rank[min(r, 1)])[0] + per_rank.get(r, per_rank[min(r, 1)])[1]
                 for r in range(t.pp)) - (compute_mb + tp_mb)
    bubble = (others + (t.pp - 1) * p2p_mb) / t.vpp

    static = mems[max(ranks, key=lambda r: per_rank[r][0])]["_static"]  # the busier end for dp's buckets
    dp_inter = t.tp * t.dp > per_node
    if t.dp > 1:
        grads, n = static["gradients"], static["buckets"]
        reduce_op = "reduce_scatter" if t.distributed_optimizer else "all_reduce"
        padded = static["param_bytes_padded"]
        # --overlap-param-gather: ZeRO-1's gather runs behind the next step's first forward
        behind_forward = t.distributed_optimizer and t.overlap_param_gather
        if measured:  # cpu-local: the reduction's measured cost beside backward's GEMMs is what it adds
            gather = hw.collective_s("all_gather", padded, n, overlapped=behind_forward) \
                if t.distributed_optimizer else 0.0
            dp_exposed = hw.collective_s(reduce_op, grads, n, overlapped=True) + gather
        else:
            reduce = hw.link_s(comm.wire_bytes(reduce_op, grads, t.dp), n, dp_inter)
            gather = hw.link_s(comm.wire_bytes("all_gather", padded, t.dp), n, dp_inter) \
                if t.distributed_optimizer else 0.0
            last_backward = (compute_mb + tp_mb) * 2 / 3
            first_forward = (compute_mb + tp_mb) / 3 / t.vpp if behind_forward else 0.0  # one micro-batch, chunk 0
            dp_exposed = max(reduce - last_backward, 0.0) + max(gather - first_forward, 0.0)
    else:
        dp_exposed = 0.0
    owned = static["params"] / (t.dp if t.distributed_optimizer else 1)
    optimizer = hw.memory_s(owned * ADAM_BYTES_PER_PARAM)

    times = {"compute": mcount * compute_mb, "tp_comm": mcount * tp_mb, "pp_p2p": mcount * p2p_mb,
             "bubble": bubble, "dp_comm": dp_exposed, "optimizer": optimizer}
    times["total"] = sum(times.values())
    tokens_per_s_per_gpu = t.global_batch * t.seq_len / times["total"] / world
    mfu = flops_per_token(m, t.seq_len) * tokens_per_s_per_gpu / (hw.peak_tflops * 1e12)
    seconds = tokens / (tokens_per_s_per_gpu * world) if tokens else 0.0
    gpu_hours = seconds * world / 3600
    mwh, tco2 = carbon(gpu_hours, hw.power_w)
    mem = {k: v for k, v in mems[fullest].items() if k != "_static"}
    return Prediction(layout, mem, mem["total"] <= hw.usable_bytes, times, tokens_per_s_per_gpu, mfu,
                      seconds / 86400, gpu_hours, mwh, tco2, params_per_gpu=max(m_["_static"]["params"]
                                                                                 for m_ in mems.values()))


CHECKPOINT_STATE_BYTES = 12  # per parameter: the fp32 master copy and both Adam moments


def checkpoint_save(pred: Prediction, run: RunConfig, hw: Hardware, write_gbps_per_node: float) -> dict:
    """One save of `pred`'s layout: every rank writes its share (`parallel.checkpoint_pieces`):
    the parameters and their optimizer state that it holds, split with the dp replicas that hold
    the same (its own slice under ZeRO-1). Taken for the fullest pipeline stage; the ranks of a
    node write at `write_gbps_per_node` together (a parallel file system's client bandwidth)."""
    lay = pred.layout
    world = lay.tp * lay.pp * lay.dp
    elt = DTYPES[run.train.dtype].itemsize
    per_gpu = pred.params_per_gpu * (elt + CHECKPOINT_STATE_BYTES) / lay.dp
    per_node = per_gpu * min(hw.gpus_per_node, world)
    return {"total_bytes": per_gpu * world, "bytes_per_gpu": per_gpu, "bytes_per_node": per_node,
            "seconds": per_node / (write_gbps_per_node * 1e9), "write_gbps_per_node": write_gbps_per_node}

