"""Layout-free parameters: each local shard knows the logical tensor it is a slice of.

A parallel layer tags its parameters with `tp_dim` (the split dimension, None when replicated
across tp), the tp rank and size, and the `logical_shape` (the unpadded full tensor). From that
alone we can initialise the same logical values whatever the layout, cut a shard from a full
tensor (conversion, checkpoints), and count each logical parameter once (gradient norm).
"""
from __future__ import annotations

import zlib

import torch
from torch import nn


def make_param(local_shape, logical_shape, tp_dim, tp_rank, tp_size, init_std, device=None, dtype=None):
    """`init_std=None` initialises to ones (norm weights); otherwise N(0, init_std²)."""
    p = nn.Parameter(torch.empty(local_shape, device=device, dtype=dtype))
    p.logical_shape = tuple(logical_shape)
    p.tp_dim, p.tp_rank, p.tp_size = tp_dim, tp_rank, tp_size
    p.init_std = init_std
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
    return comm.all_gather(local, group, dim=param.tp_dim).narrow(param.tp_dim, 0, param.logical_shape[param.tp_dim])


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
        p.copy_(shard_of(logical_init(name, p, seed), p).to(p.dtype))
