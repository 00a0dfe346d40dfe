"""Activations forward and gradients backward between pipeline stages, with batch_isend_irecv.

Transfers go in groups (`exchange`: one `batch_isend_irecv`, an NCCL group): the schedules
(schedules.lockstep_plan) put each send in the same step as its receive on the other side, so
the two are always posted together, in the same order on both ends of every link. No rank waits
in a send for a receive its peer has not posted: neither gloo's blocking send against blocking
send nor NCCL's rendezvous sends (which match in order, ignoring tags) can deadlock. Every
transfer also carries a tag naming (micro-batch, virtual stage, direction).

Before the first transfer, and whenever the activation shape changes, neighbours exchange a
header (activation shape and dtype, micro-batches, vpp, schedule) and both raise the same clear
error on a mismatch instead of waiting forever for a message of the wrong size.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from parallel import comm

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_HANDSHAKE_TAG = 1 << 30


class PipelineMismatchError(RuntimeError):
    """Two pipeline stages disagree about what they exchange."""


def _describe(header: list[int]) -> str:
    b, s, h, dtype, m, vpp, schedule = header
    return f"activations [{b}, {s}, {h}] {DTYPES[dtype]}, {m} micro-batches, vpp={vpp}, schedule #{schedule}"


class PipelineP2P:
    """Transfers between one rank and its pipeline neighbours (a ring when `ring`, for the
    interleaved schedule, where the last stage feeds the first stage's next model chunk)."""

    def __init__(self, topo, ring: bool = False):
        self.group = topo.pp_group
        self.pp, self.pp_rank, self.ranks = topo.pp, topo.pp_rank, topo.pp_ranks
        self.ring = ring
        self.device = None
        # (send handle, the tensors it reads) of the last group, waited for in the next exchange or flush()
        self.pending: list[tuple] = []
        self.header: list[int] | None = None
        self.wait_s = 0.0  # time spent blocked on receives (pipeline idle time)

    def peer(self, offset: int) -> int | None:
        """Global rank of the stage `offset` away (±1), or None past either end without a ring."""
        r = self.pp_rank + offset
        if not self.ring and not 0 <= r < self.pp:
            return None
        return self.ranks[r % self.pp]

    def handshake(self, shape, dtype, micro_batches: int, vpp: int, schedule: int, device=None) -> None:
        """Agree with both neighbours on what will cross; a no-op when nothing changed."""
        self.device = device
        header = [*shape, DTYPES.index(dtype), micro_batches, vpp, schedule]
        if header == self.header:
            return
        mine = torch.tensor(header, dtype=torch.long, device=device)
        links = [(off, self.peer(off)) for off in (1, -1) if self.peer(off) is not None]
        if not links:  # a single stage
            self.header = header
            return
        theirs = {off: torch.empty_like(mine) for off, _ in links}
        ops = []
        for off, peer in links:  # tag by direction so a ring of two ranks keeps them apart
            ops.append(dist.P2POp(dist.isend, mine, peer, self.group, _HANDSHAKE_TAG + (off > 0)))
            ops.append(dist.P2POp(dist.irecv, theirs[off], peer, self.group, _HANDSHAKE_TAG + (off < 0)))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        for off, _ in links:
            other = theirs[off].tolist()
            if other != header:
                lo, hi = sorted([(self.pp_rank, header), ((self.pp_rank + off) % self.pp, other)])
                raise PipelineMismatchError(f"pipeline stages disagree: stage {lo[0]} has {_describe(lo[1])}; "
                                            f"stage {hi[0]} has {_describe(hi[1])}")
        self.header = header

    def exchange(self, sends, recvs) -> list:
        """Post one group: `sends` is [(tensor, pipeline rank, tag)], `recvs` [(pipeline rank,
        tag)]. Returns, per receive, `take()`: wait for that tensor and return it. Sends are
        waited for in the next `exchange` or `flush()`, so computing goes on while a group is in flight."""
        expected = (list(self.header[:3]), DTYPES[self.header[3]])
        # Let go of what the earlier groups' sends read: held to the end of the step, a stage would
        # keep every activation and gradient it sent (m·vpp of them; gigabytes at 65B). Waiting
        # for them cannot deadlock: the lockstep plan posted each one's receive in the same step
        # as the send, so the peer gets there without anything this group sends. They are
        # normally done by now (gloo's send handles report completion only once waited for).
        self.flush()
        ops, sent = [], []
        for tensor, rank, tag in sends:
            if [list(tensor.shape), tensor.dtype] != list(expected):
                raise PipelineMismatchError(f"stage {self.pp_rank} would send {list(tensor.shape)} {tensor.dtype}, "
                                            f"but the pipeline agreed on {expected[0]} {expected[1]}")
            tensor = tensor.detach().contiguous()
            comm._record("p2p", tensor)
            sent.append(tensor)
            ops.append(dist.P2POp(dist.isend, tensor, self.ranks[rank], self.group, tag))
        out = [torch.empty(self.header[:3], dtype=expected[1], device=self.device) for _ in recvs]
        ops += [dist.P2POp(dist.irecv, buf, self.ranks[rank], self.group, tag) for buf, (rank, tag) in zip(out, recvs)]
        works = dist.batch_isend_irecv(ops)
        if len(works) == len(ops):
            self.pending += [(w, [t]) for w, t in zip(works[:len(sends)], sent)]
            waits = [[w] for w in works[len(sends):]]
        else:  # NCCL coalesces a group into one handle
            self.pending += [(w, sent) for w in works]
            waits = [works for _ in recvs]
        return [self._taker(buf, ws) for buf, ws in zip(out, waits)]

    def _taker(self, buf, works):
        def take() -> torch.Tensor:
            start = time.perf_counter()
            for w in works:
                w.wait()
            self.wait_s += time.perf_counter() - start
            return buf
        return take

    def flush(self) -> None:
        """Wait for every send posted so far (at the latest at the end of the step)."""
        start = time.perf_counter()
        for work, _ in self.pending:
            work.wait()
        self.wait_s += time.perf_counter() - start
        self.pending = []
