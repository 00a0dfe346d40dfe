"""Layout-free parameters: each local shard knows the logical tensor it is a slice of.

A parallel layer tags its parameters with `tp_dim` (the split dimension, None when replicated
across tp), which of `tp_size` shards this one is (`tp_rank`), and the `logical_shape` (the
unpadded full tensor). From that alone we can initialise the same logical values whatever the
layout, cut a shard from a full tensor (conversion, checkpoints), and count each logical
parameter once (gradient norm).

`tp_copies` tp ranks hold the same tensor, this one being copy `tp_copy_rank`: all tp ranks for
a replicated tensor, one for a plain shard, and `replicas` consecutive tp ranks for a shard
that is itself replicated (grouped-query attention's kv heads when tp > n_kv_heads: tp 8 over
2 kv heads cuts wk into tp_size=2 shards, each held by 4 ranks). Whoever writes or counts a
tensor once takes copy 0, or splits the work between the copies.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn


def make_param(local_shape, logical_shape, tp_dim, tp_rank, tp_size, init_std, device=None, dtype=None,
               replicas: int = 1):
    """A parameter on tp rank `tp_rank` of `tp_size`: split along `tp_dim` (None: replicated),
    each shard held by `replicas` consecutive tp ranks. `init_std=None` initialises to ones
    (norm weights); otherwise N(0, init_std²)."""
    p = nn.Parameter(torch.empty(local_shape, device=device, dtype=dtype))
    p.logical_shape = tuple(logical_shape)
    p.tp_dim, p.init_std = tp_dim, init_std
    if tp_dim is None:
        p.tp_rank, p.tp_size, p.tp_copies, p.tp_copy_rank = tp_rank, tp_size, tp_size, tp_rank
    else:
        p.tp_rank, p.tp_size = tp_rank // replicas, tp_size // replicas
        p.tp_copies, p.tp_copy_rank = replicas, tp_rank % replicas
    return p


def shard_of(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The slice of the logical tensor `full` that `param` holds (zero rows where padded)."""
    if tuple(full.shape) != param.logical_shape:
        raise ValueError(f"tensor of shape {tuple(full.shape)} does not match logical shape {param.logical_shape}")
    if param.tp_dim is None:
        return full
    d = param.tp_dim
    local = param.shape[d]
    start = param.tp_rank * local
    piece = full.narrow(d, min(start, full.shape[d]), max(0, min(local, full.shape[d] - start)))
    if piece.shape[d] < local:  # vocabulary padding: the padded rows are zeros
        pad_shape = list(piece.shape)
        pad_shape[d] = local - piece.shape[d]
        piece = torch.cat([piece, piece.new_zeros(pad_shape)], dim=d)
    return piece


def full_tensor(local: torch.Tensor, param: torch.Tensor, group) -> torch.Tensor:
    """The logical tensor from every tp rank's `local` shard of `param` (padding dropped)."""
    if param.tp_dim is None:
        return local
    from parallel import comm
    d = param.tp_dim
    shards = comm.all_gather(local, group, dim=d).split(local.shape[d], dim=d)[::param.tp_copies]
    return torch.cat(shards, dim=d).narrow(d, 0, param.logical_shape[d])


def logical_init(name: str, param: torch.Tensor, seed: int) -> torch.Tensor:
    """The full logical tensor for `name`: a function of (seed, name) only, never of the layout."""
    if param.init_std is None:
        return torch.ones(param.logical_shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.normal(0.0, param.init_std, param.logical_shape, generator=gen)


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int) -> None:
    """Give every parameter its shard of the deterministic logical initialisation."""
    for name, p in module.named_parameters():
        if p.is_meta:
            continue
        p.copy_(shard_of(logical_init(logical_name(name, p), p, seed), p).to(p.dtype))


def logical_name(name: str, param) -> str:
    """The logical tensor a parameter holds: its own name, or for the last pipeline stage's copy
    of a tied embedding (`tied_name`) the embedding's, so that it initialises, saves and loads
    as that one tensor."""
    return getattr(param, "tied_name", name)
