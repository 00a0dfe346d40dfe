"""Data parallelism: gradients in contiguous buckets, each reduced as soon as it is complete.

Every parameter's gradient is accumulated (in fp32 when the parameters are bf16) into
`param.main_grad`, a view of one flat bucket buffer; the parameters themselves become views of a
flat buffer of the same layout, so the distributed optimizer can all-gather into them in place.
When a bucket's parameters have all received their last micro-batch's gradient, its reduction
starts asynchronously (all-reduce; reduce-scatter under the distributed optimizer) while backward
goes on; `finish()` waits for them before the optimiser step. Nothing is reduced for the
micro-batches before the last of an accumulation. `overlap=False` reduces every bucket in
`finish()` instead (same result, no overlap). Matmul weights whose dtype is the bucket's (fp32
training) skip `param.grad` altogether: their layers write the weight-gradient GEMM into
`main_grad` through `add_matmul` (Megatron-LM's gradient-accumulation fusion), and the embedding
adds its gradient rows into it through `add_rows`.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel import comm

ADD_CHUNK = 1 << 20  # elements per add_ when accumulating: bounds the temporary of a dtype conversion


class Bucket:
    """A run of parameters sharing one flat gradient buffer (and one flat parameter buffer)."""

    def __init__(self, params: list[nn.Parameter], grad_dtype, dp: int, decay: bool):
        self.params, self.decay = params, decay
        numel = sum(p.numel() for p in params)
        self.numel = -(-numel // dp) * dp  # padded so that reduce-scatter splits it evenly
        device, dtype = params[0].device, params[0].dtype
        self.grad = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        self.data = torch.zeros(self.numel, dtype=dtype, device=device)
        self.offsets = []
        offset = 0
        for p in params:
            self.data[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.data[offset:offset + p.numel()].view_as(p)
            p.main_grad = self.grad[offset:offset + p.numel()].view_as(p)
            self.offsets.append(offset)
            offset += p.numel()
        self.shard_size = self.numel // dp
        self.pending = 0
        self.finish = None  # the in-flight reduction's finish()


class GradBuckets:
    def __init__(self, params: list[nn.Parameter], dp_group, bucket_mb: float = 25.0, grad_dtype=torch.float32,
                 reduce_scatter: bool = False, overlap: bool = True, decays=None, tp_group=None):
        """`decays(param) -> bool` splits buckets so that one bucket has one weight-decay setting.

        `tp_group`: the buckets then also sum, across tp, the partial gradients of parameters
        marked `sequence_parallel` (the norm weights under sp): all of a bucket's in one
        all-reduce when the bucket is complete, instead of one blocking all-reduce per norm in
        backward (Megatron-LM does it after backward, in finalize_model_grads)."""
        self.dp_group, self.dp, self.dp_rank = dp_group, comm.group_size(dp_group), comm.group_rank(dp_group)
        self.tp_group = tp_group
        self.reduce_scatter, self.overlap = reduce_scatter, overlap
        decays = decays or (lambda p: True)
        self.buckets: list[Bucket] = []
        limit = bucket_mb * 2**20 / torch.finfo(grad_dtype).bits * 8
        # A tied embedding (its copies on the first and last pipeline stages) gets a bucket of its
        # own: the same layout on both stages, so their (dp-shards of) gradients can be summed.
        tied = [p for p in params if p.requires_grad and getattr(p, "tied_group", None) is not None]
        self.buckets += [Bucket([p], grad_dtype, self.dp, decays(p)) for p in tied]
        tied_ids = {id(p) for p in tied}
        # Backward visits the last layers first: bucket in reverse order so the first bucket fills first.
        for decay in (True, False):
            run, size = [], 0
            for p in reversed([p for p in params if p.requires_grad and decays(p) == decay and id(p) not in tied_ids]):
                run.append(p)
                size += p.numel()
                if size >= limit:
                    self.buckets.append(Bucket(run, grad_dtype, self.dp, decay))
                    run, size = [], 0
            if run:
                self.buckets.append(Bucket(run, grad_dtype, self.dp, decay))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        # bucket indices by the first use of their parameters in forward (`params`' order)
        position = {id(p): k for k, p in enumerate(params)}
        self.forward_order = sorted(range(len(self.buckets)),
                                    key=lambda i: min(position[id(p)] for p in self.buckets[i].params))
        for b in self.buckets:
            b.tp_partial = [p for p in b.params if getattr(p, "sequence_parallel", False) and tp_group is not None]
            # tp ranks' copies of one shard (parallel.layers, `replicas`): partial sums over their group
            b.copies_partial = [p for p in b.params if getattr(p, "copies_group", None) is not None]
            for p in b.tp_partial + b.copies_partial:
                p.grad_summed_by_buckets = True  # the layer skips its own all-reduce (parallel.norm, layers)
        self.expected = 1
        self.accumulated: set[int] = set()
        self.launch_order: list[int] = []  # which buckets were launched, in order (tests read it)
        for p in self.bucket_of_params():
            p.register_post_accumulate_grad_hook(self._on_grad)
            # layers may write gradients straight into the bucket: the embedding always, a
            # matmul weight when its gradient has the bucket's dtype (fp32 training)
            p.main_grad_sink = self

    def bucket_of_params(self):
        return [p for b in self.buckets for p in b.params]

    def start_step(self, micro_batches: int) -> None:
        """Each parameter will receive `micro_batches` gradients before the step."""
        self.expected = micro_batches
        self.launch_order = []
        self.accumulated = set()  # ids of parameters whose main_grad already holds a gradient
        for b in self.buckets:
            b.pending = len(b.params) * micro_batches
            b.finish = None

    def _on_grad(self, p: nn.Parameter) -> None:
        # Autograd calls this once per backward for each parameter, however many times it was
        # used; p.grad is None when every use went through add_matmul.
        # The first gradient of a step is copied (converted in the same pass), later ones added:
        # no zeroing pass over the buckets, and no fp32 temporary of a bf16 gradient, which
        # torch's mixed-dtype add_ makes (costly for the embedding and the head).
        if p.grad is not None:
            if id(p) in self.accumulated:
                for main, grad in zip(p.main_grad.view(-1).split(ADD_CHUNK), p.grad.reshape(-1).split(ADD_CHUNK)):
                    main.add_(grad)
            else:
                p.main_grad.copy_(p.grad)
                self.accumulated.add(id(p))
            p.grad = None  # the bucket holds the gradient now
        elif id(p) not in self.accumulated:  # no gradient at all this step: zero, never last step's
            p.main_grad.zero_()
            self.accumulated.add(id(p))
        self._received(p)

    def add_matmul(self, p: nn.Parameter, flat_grad: torch.Tensor, flat_x: torch.Tensor) -> None:
        """main_grad += flat_gradᵀ flat_x, computed into the bucket (gradient-accumulation fusion:
        the matmul layers call this instead of returning a gradient for `p`; the post-accumulate
        hook still fires, once, and counts the parameter)."""
        if id(p) in self.accumulated:
            p.main_grad.addmm_(flat_grad.t(), flat_x)
        else:
            torch.mm(flat_grad.t(), flat_x, out=p.main_grad)
            self.accumulated.add(id(p))

    def add_rows(self, p: nn.Parameter, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """main_grad[ids] += rows (an embedding's gradient, added straight into the bucket)."""
        if id(p) not in self.accumulated:
            p.main_grad.zero_()
            self.accumulated.add(id(p))
        p.main_grad.index_add_(0, ids, rows.to(p.main_grad.dtype))

    def _received(self, p: nn.Parameter) -> None:
        bucket = self.bucket_of[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0 and self.overlap:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        if bucket.tp_partial:  # the sequence-parallel partial gradients, across tp
            _sum_partials(bucket.tp_partial, self.tp_group)
        if bucket.copies_partial:  # the copies' partial gradients, across the ranks holding them
            _sum_partials(bucket.copies_partial, bucket.copies_partial[0].copies_group)
        if self.dp > 1:
            bucket.grad.div_(self.dp)  # average, not sum, over data-parallel replicas
        if self.reduce_scatter:
            bucket.finish = comm.reduce_scatter_start(bucket.grad, self.dp_group)
        else:
            bucket.finish = comm.all_reduce_start(bucket.grad, self.dp_group)
        self.launch_order.append(self.buckets.index(bucket))

    def finish(self) -> list[torch.Tensor]:
        """Wait for every reduction; returns per bucket this rank's reduced gradient: the whole
        bucket, or under reduce-scatter its 1/dp shard."""
        out = []
        for b in self.buckets:
            if b.pending:
                raise RuntimeError(f"a gradient bucket is still waiting for {b.pending} gradients: "
                                   f"start_step(m) was told {self.expected} micro-batches")
            if b.finish is None:
                self._launch(b)
            reduced = b.finish()
            if not self.reduce_scatter and reduced is not b.grad:
                b.grad.copy_(reduced)
                reduced = b.grad
            tied_group = getattr(b.params[0], "tied_group", None)
            if tied_group is not None:  # the embedding's and the head's gradients, summed (Megatron's
                comm.all_reduce(reduced, tied_group)  # embedding group); here, after the schedule's last send
            out.append(reduced)
        return out


def _sum_partials(params: list[nn.Parameter], group) -> None:
    """Sum `params`' gradients (partial sums) across `group`: all of a bucket's in one all-reduce,
    when the bucket is complete, instead of one blocking all-reduce per use in backward
    (Megatron-LM does it after backward, in finalize_model_grads)."""
    flat = torch.cat([p.main_grad.reshape(-1) for p in params])
    comm.all_reduce(flat, group)
    for p, summed in zip(params, flat.split([p.numel() for p in params])):
        p.main_grad.copy_(summed.view_as(p))
