"""AdamW on fp32 master weights, optionally sharded over data-parallel ranks (ZeRO-1), with
global gradient-norm clipping and skipping of non-finite steps.

Mixed precision (Micikevicius et al.): parameters (and so activations) may be bf16; gradients
accumulate in fp32 buckets (`parallel.data_parallel`); AdamW updates fp32 master copies, which
are cast back into the parameters. In the pure fp32 mode the same path runs with fp32 parameters,
which are then their own master weights.

Distributed optimizer: each data-parallel rank owns 1/dp of every bucket, holds the master
weights and Adam moments of that slice only, receives the gradients of that slice by
reduce-scatter, updates it, and all-gathers the updated parameters: optimiser memory divides by dp
and the traffic equals one all-reduce. With `overlap_param_gather` (Megatron-LM's option of that
name) the all-gathers are only launched by `step()`, in the order the forward uses the buckets,
and the next forward waits for each bucket just before the first module that reads it
(`wait_before_forward`): the gather of later layers runs behind the compute of earlier ones.

The gradient norm is global over tp, pp and dp, each logical parameter counted once: a
tp-replicated tensor (norm weights) is counted on tp rank 0 only, sharded tensors on every rank.
"""
from __future__ import annotations

import math

import torch

from parallel import comm
from parallel.data_parallel import GradBuckets


def nvidia_apex_fused_adam():
    """NVIDIA apex's FusedAdam when NVIDIA's build is installed (never the unrelated PyPI 'apex')."""
    try:
        from apex.optimizers import FusedAdam
    except Exception:
        return None
    return FusedAdam


def make_adamw(groups, lr, betas, eps, device_type: str):
    apex_adam = nvidia_apex_fused_adam() if device_type == "cuda" else None
    if apex_adam is not None:
        return apex_adam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


class Optimizer:
    def __init__(self, buckets: GradBuckets, topo, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, grad_clip: float = 1.0, distributed: bool = False,
                 overlap_param_gather: bool = False):
        self.buckets, self.topo, self.grad_clip, self.distributed = buckets, topo, grad_clip, distributed
        self.overlap_param_gather = overlap_param_gather and distributed
        self._gathers: dict[int, object] = {}  # bucket index -> finish() of its parameter all-gather, launch order
        dp_rank = buckets.dp_rank
        self.ranges, self.masters, self.norm_slices = [], [], []
        for b in buckets.buckets:
            lo, hi = (dp_rank * b.shard_size, (dp_rank + 1) * b.shard_size) if distributed else (0, b.numel)
            self.ranges.append((lo, hi))
            shard = b.data[lo:hi].detach()
            self.masters.append(shard if shard.dtype == torch.float32 else shard.float())
            self.norm_slices.append(self._counted_slices(b, lo, hi))
        # fp32 parameters are their own master weights: no copy to keep, none to write back
        self.master_is_param = [m.dtype == b.data.dtype for m, b in zip(self.masters, buckets.buckets)]
        groups = [{"params": [m], "weight_decay": weight_decay if b.decay else 0.0}
                  for m, b in zip(self.masters, buckets.buckets)]
        self.adam = make_adamw(groups, lr, betas, eps, self.masters[0].device.type)
        self.steps_skipped = 0
        self.steps_taken = 0  # updates applied: Adam's bias-correction step, whichever AdamW runs

    def _counted_slices(self, bucket, lo, hi):
        """Slices of [lo, hi) (relative to lo) whose parameters this rank counts in the norm."""
        out = []
        for p, off in zip(bucket.params, bucket.offsets):
            if p.tp_copy_rank != 0 or getattr(p, "tied_copy", False):
                continue  # held by several ranks (tp copies, a tied embedding's stages): one counts it
            start, end = max(off, lo), min(off + p.numel(), hi)
            if start < end:
                out.append(slice(start - lo, end - lo))
        return out

    def state_bytes(self) -> int:
        """Bytes of fp32 master weights (unless the parameters serve as them) and Adam moments held by this rank."""
        return sum(m.numel() * m.element_size() * (2 if self.master_is_param[i] else 3)
                   for i, m in enumerate(self.masters))

    def global_grad_norm(self, grads) -> float:
        pieces = [g[s] for g, slices in zip(grads, self.norm_slices) for s in slices]
        norms = torch._foreach_norm(pieces) if pieces else [torch.zeros((), device=grads[0].device)]
        sq = torch.stack([n.double() for n in norms]).pow(2).sum()
        comm.all_reduce(sq, self.topo.mp_group, name="norm_all_reduce")
        if self.distributed:  # each dp rank holds a different slice
            comm.all_reduce(sq, self.topo.dp_group, name="norm_all_reduce")
        return math.sqrt(sq.item()) if math.isfinite(sq.item()) else float("nan")

    def step(self, lr: float) -> tuple[float, bool]:
        """Finish the gradient reductions, clip, update. Returns (grad_norm, skipped): a step
        whose gradient norm is not finite changes nothing and is reported as skipped."""
        grads = self.buckets.finish()
        norm = self.global_grad_norm(grads)
        if not math.isfinite(norm):
            self.steps_skipped += 1
            return norm, True
        scale = min(1.0, self.grad_clip / (norm + 1e-6))
        for master, g, group in zip(self.masters, grads, self.adam.param_groups):
            master.grad = g if g.dtype == torch.float32 else g.float()
            if scale < 1.0:
                master.grad.mul_(scale)
            group["lr"] = lr
        self.adam.step()
        self.steps_taken += 1
        for i, (master, (lo, hi), b) in enumerate(zip(self.masters, self.ranges, self.buckets.buckets)):
            master.grad = None
            if not self.master_is_param[i]:
                b.data[lo:hi].copy_(master)
        if self.distributed:
            self._gather_params()
        return norm, False

    # --- ZeRO-1: every dp rank's updated slice to every dp rank ---

    def _gather_params(self) -> None:
        self.wait_params()  # a bucket no forward read since the last step (none in our models)
        for i in self.buckets.forward_order:
            lo, hi = self.ranges[i]
            b = self.buckets.buckets[i]
            self._gathers[i] = comm.all_gather_into_start(b.data, b.data[lo:hi], self.buckets.dp_group)
        if not self.overlap_param_gather:
            self.wait_params()

    def wait_params(self, buckets=None) -> None:
        """Wait for the parameter all-gathers in flight: all of them, or those of the bucket
        indices `buckets`. Anything that reads or writes parameters outside a forward calls this
        first: a checkpoint's save and load (before the optimizer's own loading), the end of
        training."""
        for i in list(self._gathers) if buckets is None else [i for i in buckets if i in self._gathers]:
            self._gathers.pop(i)()

    def wait_before_forward(self, modules) -> None:
        """Under overlap_param_gather: before a submodule of `modules` runs its forward, wait for
        the gathers of the buckets holding its parameters, its children's included (a layer may
        use its children's weights without calling them: the column layers' fused matmuls). The
        roots' hooks cover only their own parameters: a root's forward starts the whole chunk."""
        if not self.overlap_param_gather:
            return
        index = {id(b): i for i, b in enumerate(self.buckets.buckets)}
        for root in modules:
            for sub in root.modules():
                params = sub.parameters(recurse=sub is not root)
                mine = sorted({index[id(self.buckets.bucket_of[id(p)])] for p in params
                               if id(p) in self.buckets.bucket_of})
                if mine:
                    sub.register_forward_pre_hook(lambda _m, _a, mine=mine: self.wait_params(mine)
                                                  if self._gathers else None)

    # --- checkpointing: per bucket, this rank's slice of master weights and Adam moments ---

    STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")

    def bucket_state(self, i: int) -> dict[str, torch.Tensor]:
        master = self.masters[i]
        state = self.adam.state.get(master, {})
        zeros = torch.zeros_like(master)
        return {"master": master, "exp_avg": state.get("exp_avg", zeros), "exp_avg_sq": state.get("exp_avg_sq", zeros)}

    @property
    def adam_step(self) -> int:
        return self.steps_taken

    def load_bucket_state(self, i: int, tensors: dict[str, torch.Tensor], adam_step: int) -> None:
        master = self.masters[i]
        master.copy_(tensors["master"])
        if self.distributed and self.master_is_param[i]:
            # this rank just wrote its slice of the parameters: every dp rank needs every slice
            b = self.buckets.buckets[i]
            comm.all_gather_into(b.data, master, self.buckets.dp_group)
        self.steps_taken = adam_step
        if "step" in self.adam.param_groups[i]:  # apex's FusedAdam counts steps per group
            self.adam.param_groups[i]["step"] = adam_step
        if adam_step:
            self.adam.state[master] = {
                "step": torch.tensor(float(adam_step), dtype=torch.float32, device=master.device),
                "exp_avg": tensors["exp_avg"].to(master.device).clone(),
                "exp_avg_sq": tensors["exp_avg_sq"].to(master.device).clone()}

    def masters_from_params(self) -> None:
        """Restart the master weights from the parameters (after loading weights only)."""
        for master, (lo, hi), b in zip(self.masters, self.ranges, self.buckets.buckets):
            master.copy_(b.data[lo:hi])
