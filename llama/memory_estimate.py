"""Predicted activation memory per rank, for the start-up summary (the weights, gradient buckets
and optimizer state it prints are the real tensors' sizes): the per-layer accounting that
`benchmarks/activation_memory.py` checks against measurement (ratio 1.00 in every mode) times
the micro-batches the schedule keeps in flight on this pipeline rank.
"""
from __future__ import annotations

from parallel.pipeline.schedules import schedule_order


def activation_bytes_per_layer(mode: str, s: int, b: int, h: int, f: int, a: int, t: int, sp: bool,
                               keep: bool = False, kv: int | None = None) -> float:
    """Bytes per layer and rank with bf16 activations (the accounting of benchmarks/activation_memory.py).
    kv: the kv heads (grouped-query attention); selective recompute keeps wk's and wv's outputs,
    a fraction max(kv, t)/a of wq's on each rank (a copy of one kv head when t > kv). Without
    recompute the k and v attention reads are repeated to every query head: full width."""
    E, F, r = s * b * h, s * b * f, (t if sp else 1)
    lse = 4 * a * s * b / t
    if mode == "none":
        norms = 4 * E / r + 4 * E if keep else 8 * E / r
        return norms + 8 * E / t + 6 * F / t + lse + 8 * s * b / r
    if mode == "selective":
        kv_width = min(1.0, max(kv or a, t) / a)
        return 2 * E / r + (4 + 4 * kv_width) * E / t + 4 * E + 4 * F / t + lse
    return 2 * E / r


def micro_batches_in_flight(schedule: str, m: int, pp: int, pp_rank: int, vpp: int) -> int:
    """Most (micro-batch, chunk) forwards whose activations the schedule keeps at once on this rank."""
    live = peak = 0
    for kind, _, _ in schedule_order(schedule, m, pp, pp_rank, vpp):
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def activation_bytes(model, train, tp: int, pp: int, pp_rank: int, local_layers: int, m: int) -> float:
    """Activation bytes one rank keeps at its peak: per layer (bf16 accounting, ×2 in fp32), times
    its layers per chunk, times the micro-batches its schedule keeps in flight."""
    per_layer = activation_bytes_per_layer(train.recompute, train.seq_len, train.micro_batch, model.dim,
                                           model.ffn_dim, model.n_heads, tp, train.sp, train.sp_keep_gathered,
                                           model.kv_heads)
    dtype_bytes = 2 if train.dtype == "bf16" else 4
    flight = micro_batches_in_flight(train.schedule, m, pp, pp_rank, train.vpp)
    return per_layer * dtype_bytes / 2 * local_layers / train.vpp * flight
