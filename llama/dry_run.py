"""`llama-train --dry-run --world-size N --rank R [R ...]`: rank R's whole set-up of an N-rank
job, in one CPU process, before an allocation is spent.

The same code as a real start-up (the layout check, `llama.setup.build_rank`: the run's checks,
the model chunks, the gradient buckets, the optimizer, the pipeline links), on torch's fake
process group at the full world size (`llama.fake_world`) and the meta device: every tensor has
its real shape and no storage, and no collective computes anything. So a layout that a real job
would refuse fails here with the same one line, and the figures printed are those of the job:
the rank's groups and the nodes its peers sit on, its parameters per model chunk, its memory,
and what it sends per step.

What a rank sends per step follows from the real shapes (the activation crossing stages, the
gradient buckets) with the formulas that tests/parallel/test_traffic.py checks against
`parallel.comm`'s counters (Korthikanti et al. 2022): under tp, 4 all-reduces of b·s·h per layer
and micro-batch (2 forward, 2 backward); under tp + sp, 4 reduce-scatters and 4 all-gathers plus
2 re-gathers of the column layers' inputs in backward; recompute runs the forward's collectives
again in backward, all but the layer's last (see step_traffic); pp, one activation forward and
one gradient back per micro-batch and chunk boundary, in the schedule's order; dp, one all-reduce
of the fp32 gradient buckets (ZeRO-1: a reduce-scatter of them and an all-gather of the parameters).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama.config import ConfigError, RunConfig
from llama.fake_world import fake_world
from llama.setup import DTYPES, RankSetup, build_rank, human_bytes, memory_breakdown
from parallel import comm
from parallel.pipeline.schedules import schedule_order
from parallel.topology import build_topology, check_layout, node_crossing_message, tp_groups_crossing_nodes


@dataclass(frozen=True)
class Message:
    """One kind of transfer a rank makes per step: `calls` of them, `buffer_bytes` in all as
    `parallel.comm` counts them (op is its counter's name), over a group of `ranks`."""
    group: str
    op: str
    what: str
    calls: int
    buffer_bytes: int
    ranks: int

    @property
    def wire_bytes(self) -> float:
        """What this rank puts on the wire (ring all-reduce 2(n-1)/n of the buffer, all-gather
        and reduce-scatter (n-1)/n, point-to-point the buffer)."""
        kind = "all_reduce" if self.op.endswith("all_reduce") else self.op
        return comm.wire_bytes(kind, self.buffer_bytes, self.ranks)


def step_traffic(run: RunConfig, topo, setup: RankSetup) -> list[Message]:
    """Everything this rank sends in one training step (forward, backward, optimizer)."""
    m, t = run.model, run.train
    mb, elt = setup.accumulation, DTYPES[t.dtype].itemsize
    full = t.micro_batch * t.seq_len * m.dim * elt  # b·s·h: what an (sp-)collective's buffer holds
    layers = sum(len(c.layers) for c in setup.chunks)
    first = any(c.first_stage for c in setup.chunks)
    last = any(c.last_stage for c in setup.chunks)
    # Recompute runs each layer's forward again in backward, up to the last tensor backward needs
    # (torch's checkpoint stops there): both column-input collectives again, only the first
    # row-output one (the second, w2's, feeds nothing saved).
    again = 1 if t.recompute != "none" else 0
    out: list[Message] = []

    def add(group, op, what, calls, buffer_bytes, ranks):
        if calls and ranks > 1:
            out.append(Message(group, op, what, calls, int(buffer_bytes), ranks))

    tp = topo.tp
    if tp > 1 and not t.sp:
        per_layer = 4 + again
        add("tp", "all_reduce", "layer activations and their gradients", mb * layers * per_layer,
            mb * layers * per_layer * full, tp)
        add("tp", "all_reduce", "embedding output", mb * first, mb * first * full, tp)
        add("tp", "all_reduce", "head input gradient", mb * last, mb * last * full, tp)
    elif tp > 1:
        regather = 0 if t.sp_keep_gathered else 1
        gathers = layers * (4 + 2 * again + 2 * regather) + first + last * (1 + regather)
        scatters = layers * (4 + again) + first + last
        add("tp", "all_gather", "sequence shards (forward, re-gathers, gradients)", mb * gathers,
            mb * gathers * full, tp)
        add("tp", "reduce_scatter", "layer outputs and input gradients", mb * scatters, mb * scatters * full, tp)
        norms = [b for b in setup.buckets.buckets if b.tp_partial]
        add("tp", "all_reduce", "norm-weight gradients (sp partial sums)", len(norms),
            sum(p.numel() for b in norms for p in b.tp_partial) * setup.buckets.buckets[0].grad.element_size(), tp)
    copied = [b for b in setup.buckets.buckets if b.copies_partial]
    if copied:  # tp > n_kv_heads: the buckets sum wk's and wv's copies' gradients
        add("tp copies", "all_reduce", "wk, wv gradients of kv-head copies (fp32)", len(copied),
            sum(p.numel() for b in copied for p in b.copies_partial) * copied[0].grad.element_size(),
            copied[0].copies_partial[0].tp_copies)
    if tp > 1 and last:  # vocab-parallel cross-entropy: max, sum of exponentials, target logit (fp32)
        add("tp", "loss_all_reduce", "cross-entropy statistics", 3 * mb, 3 * mb * t.micro_batch * t.seq_len * 4, tp)

    n_virtual = topo.pp * t.vpp
    sends = 0
    for kind, _, c in schedule_order(t.schedule, mb, topo.pp, topo.pp_rank, t.vpp):
        j = c * topo.pp + topo.pp_rank
        sends += (j != n_virtual - 1) if kind == "F" else (j != 0)
    add("pp", "p2p", "activations forward, gradients back", sends, sends * math.prod(setup.shape) * elt, topo.pp)

    buckets = setup.buckets.buckets
    grads = sum(b.grad.numel() * b.grad.element_size() for b in buckets)
    if t.distributed_optimizer:
        add("dp", "reduce_scatter", "gradient buckets (fp32)", len(buckets), grads, topo.dp)
        add("dp", "all_gather", "updated parameters", len(buckets),
            sum(b.data.numel() * b.data.element_size() for b in buckets), topo.dp)
    else:
        add("dp", "all_reduce", "gradient buckets (fp32)", len(buckets), grads, topo.dp)
    tied = [b for b in buckets if getattr(b.params[0], "tied_group", None) is not None]
    for b in tied:  # the first and last stages sum their tied embedding's gradient
        add("embedding", "all_reduce", "tied embedding gradient", 1,
            (b.shard_size if t.distributed_optimizer else b.numel) * b.grad.element_size(), 2)
    add("mp", "norm_all_reduce", "gradient norm", 1, 8, topo.tp * topo.pp)
    if t.distributed_optimizer:
        add("dp", "norm_all_reduce", "gradient norm (ZeRO-1 slices)", 1, 8, topo.dp)
    add("world", "loss_all_reduce", "the step's mean loss", 1, 8, topo.world)
    return out


def traffic_totals(messages: list[Message]) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, calls) per `parallel.comm` counter name: what comm.TRAFFIC and comm.CALLS show
    after the same step on a real rank."""
    size, calls = Counter(), Counter()
    for msg in messages:
        size[msg.op] += msg.buffer_bytes
        calls[msg.op] += msg.calls
    return dict(size), dict(calls)


def _span(values: list[int]) -> str:
    """[3, 5, 7] → '3..7 step 2'; [4, 5] → '4, 5'; an irregular list is written out (or cut)."""
    values = sorted(set(values))
    if len(values) > 2:
        steps = {b - a for a, b in zip(values, values[1:])}
        if len(steps) == 1:
            step = steps.pop()
            return f"{values[0]}..{values[-1]}" + (f" step {step}" if step > 1 else "")
    text = ", ".join(map(str, values[:8]))
    return text + (f", … ({len(values)} in all)" if len(values) > 8 else "")


def _members(group) -> list[int]:
    return dist.get_process_group_ranks(group) if group is not None else [dist.get_rank()]


def _group_lines(topo, gpus_per_node: int) -> list[str]:
    lines = []
    for name, group in (("tp", topo.tp_group), ("pp", topo.pp_group), ("dp", topo.dp_group)):
        ranks = _members(group)
        nodes = [r // gpus_per_node for r in ranks]
        lines.append(f"  {name} group ({len(ranks)}): ranks {_span(ranks)}; "
                     f"node{'s' if len(set(nodes)) > 1 else ''} {_span(nodes)}")
    return lines


def rank_report(run: RunConfig, topo, setup: RankSetup, gpus_per_node: int) -> str:
    """Rank `topo.rank`'s block of the dry run: groups, parameters, memory, traffic per step."""
    m, t = run.model, run.train
    sp = " sp" if t.sp and topo.tp > 1 else ""
    lines = [f"rank {topo.rank} of {topo.world} (node {topo.rank // gpus_per_node} at {gpus_per_node} per node): "
             f"tp rank {topo.tp_rank}, dp rank {topo.dp_rank}, pp rank {topo.pp_rank}; "
             f"layout tp {topo.tp}{sp} x pp {topo.pp} (vpp {t.vpp}, {t.schedule}) x dp {topo.dp}"]
    lines += _group_lines(topo, gpus_per_node)
    local = sum(p.numel() for p in setup.params)
    lines.append(f"parameters: {local:,} on this rank of the model's {m.num_params():,}")
    for i, chunk in enumerate(setup.chunks):
        ids = [int(k) for k in chunk.layers]
        extra = (" + embedding" if chunk.first_stage else "") + (" + norm, head" if chunk.last_stage else "")
        lines.append(f"  chunk {i}: layers {_span(ids)}{extra}: {sum(p.numel() for p in chunk.parameters()):,}")
    mem = {k: human_bytes(v) for k, v in memory_breakdown(run, topo, setup).items()}
    lines.append(f"memory: {mem['total']} (weights {mem['weights']}, gradients {mem['gradients']}, "
                 f"optimizer {mem['optimizer']}, activations {mem['activations']}, predicted)")
    messages = step_traffic(run, topo, setup)
    lines.append(f"sent per step ({setup.accumulation} micro-batches of {list(setup.shape)} {t.dtype}):")
    for msg in messages:
        lines.append(f"  {msg.group:>5} {msg.op:<15} {msg.calls:>7,} x  buffers {human_bytes(msg.buffer_bytes):>11}  "
                     f"wire {human_bytes(msg.wire_bytes):>11}  {msg.what}")
    lines.append(f"  total on the wire: {human_bytes(sum(msg.wire_bytes for msg in messages))}")
    return "\n".join(lines)


def dry_run(run: RunConfig, world_size: int, ranks: list[int], gpus_per_node: int = 8) -> str:
    """Set up each of `ranks` of a `world_size`-rank job as the trainer would, on the fake
    process group and the meta device; returns their reports. Raises what a real start-up
    raises (the same classes and messages) for a layout or config that cannot run."""
    t = run.train
    check_layout(world_size, t.tp, t.pp, t.dp or None)  # launcher.init.initialize's first check
    for rank in ranks:
        if not 0 <= rank < world_size:
            raise ConfigError(f"--rank {rank} is outside the world of {world_size} ranks (0..{world_size - 1})")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {gpus_per_node} must be at least 1")
    blocks = []
    for rank in ranks:
        with fake_world(world_size, rank):
            topo = build_topology(t.tp, t.pp, t.dp or None)
            setup = build_rank(run, topo, torch.device("meta"), seed=None)
            blocks.append(rank_report(run, topo, setup, gpus_per_node))
    crossing = tp_groups_crossing_nodes(t.tp, world_size, gpus_per_node)
    if crossing:
        blocks.append("warning: " + node_crossing_message(crossing, t.tp, gpus_per_node))
    return "\n\n".join(blocks)
