"""Predicted memory per rank: what the start-up summary prints before the first step.

Parameters are counted on the rank's real model chunks (never a formula), states follow from
the precision and the optimizer, and activations use the per-layer accounting that
`benchmarks/activation_memory.py` checks against measurement (ratio 1.00 in every mode) times
the micro-batches the schedule keeps in flight on this pipeline rank.
"""
from __future__ import annotations

from parallel.pipeline.schedules import schedule_order


def activation_bytes_per_layer(mode: str, s: int, b: int, h: int, f: int, a: int, t: int, sp: bool,
                               keep: bool = False) -> float:
    """Bytes per layer and rank with bf16 activations (the accounting of benchmarks/activation_memory.py)."""
    E, F, r = s * b * h, s * b * f, (t if sp else 1)
    lse = 4 * a * s * b / t
    if mode == "none":
        norms = 4 * E / r + 4 * E if keep else 8 * E / r
        return norms + 8 * E / t + 6 * F / t + lse + 8 * s * b / r
    if mode == "selective":
        return 2 * E / r + 8 * E / t + 4 * E + 4 * F / t + lse
    return 2 * E / r


def micro_batches_in_flight(schedule: str, m: int, pp: int, pp_rank: int, vpp: int) -> int:
    """Most (micro-batch, chunk) forwards whose activations the schedule keeps at once on this rank."""
    live = peak = 0
    for kind, _, _ in schedule_order(schedule, m, pp, pp_rank, vpp):
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def state_bytes(local_params: int, dtype_bytes: int, dp: int, distributed_optimizer: bool) -> dict[str, float]:
    """Weights, fp32 gradient buckets, and fp32 master weights (bf16 only) with Adam's two moments."""
    master = 4 if dtype_bytes != 4 else 0
    optimizer = local_params * (master + 8) / (dp if distributed_optimizer else 1)
    return {"weights": local_params * dtype_bytes, "gradients": local_params * 4, "optimizer": optimizer}


def predicted_memory(model, train, tp: int, pp: int, dp: int, pp_rank: int, local_params: int,
                     local_layers: int, m: int) -> dict[str, float]:
    """Bytes on one rank, broken down (activations: bf16 accounting, also used for fp32 ×2)."""
    dtype_bytes = 2 if train.dtype == "bf16" else 4
    out = state_bytes(local_params, dtype_bytes, dp, train.distributed_optimizer)
    per_layer = activation_bytes_per_layer(train.recompute, train.seq_len, train.micro_batch, model.dim,
                                           model.ffn_dim, model.n_heads, tp, train.sp, train.sp_keep_gathered)
    layers_per_chunk = local_layers / train.vpp
    flight = micro_batches_in_flight(train.schedule, m, pp, pp_rank, train.vpp)
    out["activations"] = per_layer * dtype_bytes / 2 * layers_per_chunk * flight
    out["total"] = sum(out.values())
    return out
