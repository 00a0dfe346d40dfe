"""Activations forward and gradients backward between pipeline stages, with batch_isend_irecv.

Every transfer carries a tag naming (micro-batch, virtual stage, direction), so on gloo a
receive can only match the send it is meant for. A send is not posted on its own: it waits
and is posted together with this rank's next receive, in one `batch_isend_irecv` (an NCCL
group), as Megatron-LM pairs send-forward with receive-backward; what is left is posted at the
end of the step (`flush`). So a rank only ever blocks on a receive, never on a send, and two
neighbours cannot deadlock sending to each other at once (gloo's blocking send against blocking
send; NCCL's sends, which may wait for the matching receive and match in order, not by tag).

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
        self.unposted: list = []         # sends waiting to go out with the next receive
        self.pending: list = []          # send handles, waited for in flush()
        self.pending_tensors: list = []  # what those sends read: alive until sent
        self.device = None
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

    def send(self, tensor: torch.Tensor, offset: int, tag: int) -> None:
        expected = (list(self.header[:3]), DTYPES[self.header[3]])
        if [list(tensor.shape), tensor.dtype] != list(expected):
            raise PipelineMismatchError(f"stage {self.pp_rank} would send {list(tensor.shape)} {tensor.dtype}, but "
                                        f"the pipeline agreed on {expected[0]} {expected[1]}")
        tensor = tensor.detach().contiguous()
        comm._record("p2p", tensor)
        self.unposted.append(dist.P2POp(dist.isend, tensor, self.peer(offset), self.group, tag))

    def _post(self, ops) -> list:
        """Post the waiting sends with `ops`; returns the handles to wait on for `ops`."""
        everything = self.unposted + ops
        works = dist.batch_isend_irecv(everything)
        n_sends = len(self.unposted)
        self.pending_tensors += [op.tensor for op in self.unposted]  # alive until sent
        self.unposted = []
        if len(works) != len(everything):  # NCCL coalesces the group into one handle
            return works
        self.pending += works[:n_sends]
        return works[n_sends:]

    def recv(self, offset: int, tag: int) -> torch.Tensor:
        out = torch.empty(self.header[:3], dtype=DTYPES[self.header[3]], device=self.device)
        start = time.perf_counter()
        for work in self._post([dist.P2POp(dist.irecv, out, self.peer(offset), self.group, tag)]):
            work.wait()
        self.wait_s += time.perf_counter() - start
        return out

    def flush(self) -> None:
        """Post what is left and wait for every send of this step."""
        if self.unposted:
            self._post([])
        for work in self.pending:
            work.wait()
        self.pending, self.pending_tensors = [], []
