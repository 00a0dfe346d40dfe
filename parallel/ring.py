"""Ring collectives over point-to-point messages, which gloo (CPU) runs faster than its own.

Measured on this project's CPU machine (`python -m benchmarks.ring_collectives`, 2 MB): on 2
ranks the ring's reduce-scatter takes 0.32–0.46 and its all-gather 0.75–0.94 of the time of
gloo's own (gloo's reduce-scatter is slower than its all-reduce of the same buffer, and it copies
a gathered result once more inside); on 4 ranks 0.64–0.67 and 0.95. gloo's all-reduce is faster
than the ring's, so `parallel.comm` keeps it; NCCL's collectives are the fast path on GPUs, so
`parallel.comm` uses these on gloo groups only.

The ring (Patarasuk & Yuan 2009): with n ranks and the buffer cut into n chunks, n − 1 steps in
each of which every rank sends one chunk to rank + 1 and receives one from rank − 1.
Reduce-scatter adds what it receives, so rank r ends with the sum of chunk r; all-gather
forwards the chunks; all-reduce is the one then the other. Each rank sends (n − 1)/n of the
buffer per phase, the optimum. The steps before the last run at once; the last step's messages
are in flight until the returned `finish()` (for n = 2 there is only that step).
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

# Every ring call on a group takes the next tag of that group (all its ranks call collectives in
# the same order, so they agree), so the messages of calls in flight together, such as two
# buckets' reduce-scatters, can never be matched with each other's. Tags sit between 2^29 and
# 2^30, apart from the pipeline's (micro-batch and stage numbers below, handshakes at 2^30).
_TAG_BASE, _TAG_SPAN = 1 << 29, 1 << 20
_calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a destroyed group is forgotten


def _next_tag(group) -> int:
    _calls[group] = _calls.get(group, 0) + 1
    return _TAG_BASE + _calls[group] % _TAG_SPAN


def is_gloo(group) -> bool:
    return group is not None and dist.get_backend(group) == "gloo"


def _exchange(send: torch.Tensor, recv: torch.Tensor, group, tag: int):
    """Send to the next rank of the ring, receive from the previous one; returns the works."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, group=group, tag=tag, group_peer=(r + 1) % n),
                                   dist.P2POp(dist.irecv, recv, group=group, tag=tag, group_peer=(r - 1) % n)])


def _wait(works) -> None:
    for work in works:
        work.wait()


def _then(works, result: torch.Tensor):
    """A `finish()` that waits for `works` and returns `result`."""
    return lambda: (_wait(works), result)[1]


def _reduce_scatter_steps(chunks: list[torch.Tensor], group, tag: int, last_into: torch.Tensor):
    """Run the reduce-scatter ring over `chunks` (summed into in place, except chunk r), leaving
    the last step in flight; returns (works, received) for chunk r's last addition."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    works, received = [], last_into
    for step in range(n - 1):
        target = (r - step - 2) % n  # the chunk that what arrives belongs to
        received = last_into if step == n - 2 else torch.empty_like(chunks[target])
        works = _exchange(chunks[(r - step - 1) % n], received, group, tag)
        if step < n - 2:
            _wait(works)
            chunks[target].add_(received)
    return works, received


def _all_gather_steps(chunks: list[torch.Tensor], group, tag: int):
    """Run the all-gather ring over `chunks` (rank r's own is filled), leaving the last step in
    flight; returns its works."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    works = []
    for step in range(n - 1):
        works = _exchange(chunks[(r - step) % n], chunks[(r - step - 1) % n], group, tag)
        if step < n - 2:
            _wait(works)
    return works


def reduce_scatter_start(tensor: torch.Tensor, group):
    """Sum `tensor` [n·m, ...] (contiguous) across `group` and keep rows [r·m, (r+1)·m) of the
    sum; returns `finish()`, which waits and returns them. `tensor` is left as it was."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    work = tensor if n == 2 else tensor.clone()  # running sums go into the chunks for n > 2
    chunks = list(work.chunk(n))
    received = torch.empty_like(chunks[r])
    works, _ = _reduce_scatter_steps(chunks, group, _next_tag(group), received)

    def finish() -> torch.Tensor:
        _wait(works)
        return received.add_(chunks[r])
    return finish


def all_gather_start(shard: torch.Tensor, group, out: torch.Tensor | None = None):
    """Every rank's `shard` [m, ...] stacked in rank order into `out` [n·m, ...] (new unless
    given; the shard may be `out`'s own rows r·m…); returns `finish()`, which waits and returns it."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if out is None:
        out = torch.empty((n * shard.shape[0], *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
    chunks = out.view(n * shard.shape[0], *shard.shape[1:]).chunk(n)
    if chunks[r].data_ptr() != shard.data_ptr():
        chunks[r].copy_(shard)
    return _then(_all_gather_steps(chunks, group, _next_tag(group)), out)


def all_reduce_start(tensor: torch.Tensor, group):
    """Sum the contiguous `tensor` across `group` in place; returns `finish()`, which waits and
    returns it. The reduce-scatter phase runs at once, the all-gather's last step in flight."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    chunks = list(tensor.view(-1).tensor_split(n))  # sizes may differ by one element
    tag = _next_tag(group)
    works, received = _reduce_scatter_steps(chunks, group, tag, torch.empty_like(chunks[r]))
    _wait(works)
    chunks[r].add_(received)
    return _then(_all_gather_steps(chunks, group, tag), tensor)
