"""Split n_layers over pp stages, and over vpp model chunks per stage for the interleaved schedule.

Model chunk j (0 ≤ j < pp·vpp) is virtual stage j; it lives on pipeline rank j % pp as that
rank's chunk j // pp (Narayanan et al. 2021): rank r holds chunks r, r+pp, r+2pp, … The first
virtual stage also holds the embedding; the last holds the final norm, the output head and the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from parallel.topology import divisors


class PartitionError(ValueError):
    """The layers cannot be split as asked; raised before any collective."""


@dataclass(frozen=True)
class Chunk:
    layer_ids: tuple[int, ...]
    first: bool  # holds the embedding
    last: bool   # holds the final norm, the output head and the loss


def chunk_sizes(n_layers: int, pp: int, vpp: int = 1, stage_layers: list[int] | None = None) -> list[int]:
    """Layers per virtual stage. `stage_layers` gives an uneven split explicitly (one entry per
    virtual stage, e.g. [9, 9, 9, 5] to lighten the stage that also computes the head)."""
    n_virtual = pp * vpp
    if pp < 1 or vpp < 1:
        raise PartitionError(f"pp={pp} and vpp={vpp} must be positive")
    if stage_layers is not None:
        if len(stage_layers) != n_virtual or sum(stage_layers) != n_layers or min(stage_layers) < 1:
            raise PartitionError(f"stage_layers={stage_layers} must have pp*vpp={n_virtual} positive entries "
                                 f"summing to n_layers={n_layers}")
        return list(stage_layers)
    if n_layers % n_virtual:
        good = divisors(n_layers)
        raise PartitionError(f"n_layers={n_layers} is not divisible by pp*vpp={pp}*{vpp}={n_virtual}; choose "
                             f"pp*vpp in {good} or give stage_layers")
    return [n_layers // n_virtual] * n_virtual


def chunks_of_rank(n_layers: int, pp: int, pp_rank: int, vpp: int = 1,
                   stage_layers: list[int] | None = None) -> list[Chunk]:
    """The model chunks pipeline rank `pp_rank` holds, in the order it runs them."""
    sizes = chunk_sizes(n_layers, pp, vpp, stage_layers)
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    out = []
    for c in range(vpp):
        j = c * pp + pp_rank
        out.append(Chunk(tuple(range(starts[j], starts[j] + sizes[j])), first=j == 0, last=j == pp * vpp - 1))
    return out
