"""The work of one training micro-batch, counted on the real model: FLOPs of the matrix
multiplications and of attention, bytes read and written by every other kernel, kernel launches,
and the tensor-parallel collectives with their bytes. Nothing here is a formula of the model:
one layer (and the pipeline's first- and last-stage extras) runs forward and backward on the
meta device, inside a fake process group of tp ranks, under the recompute mode and sequence
parallelism asked for, and every aten operator it dispatches is classified and counted.

The planner (`llama.perf_model`) turns this work into seconds with a hardware table.

On the meta device torch's SDPA decomposes into its math path (bmm, softmax); a real GPU runs a
fused flash kernel. While profiling, causal SDPA is routed (patched for the duration) to the flash operator, whose meta
kernel and autograd formula torch provides, so the counts are those of the fused kernel. Its
FLOPs are the causal half (the kernel skips masked blocks): 2·b·s²·h_local forward and 2.5×
that backward (flash attention's backward recomputes the scores: 5 matmuls against 2).
"""
from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama.config import LlamaConfig
from llama.model import Transformer
from parallel import comm, loss
from parallel.layers import TensorParallel
from parallel.memory import PeakTensorMemory
from parallel.topology import build_topology

_aten = torch.ops.aten
MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.addmm_.default, _aten.mm.out,
           _aten.addmm.out}
FLASH_FWD, FLASH_BWD = _aten._scaled_dot_product_flash_attention.default, \
    _aten._scaled_dot_product_flash_attention_backward.default
FLASH_BACKWARD_RATIO = 2.5
# Operators that move no data: views, metadata, allocation without initialisation.
FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
        "detach", "alias", "empty", "promote_types", "view_as_real", "view_as_complex", "as_strided",
        "split", "split_with_sizes", "unbind", "_reshape_alias", "lift_fresh", "sym_size", "is_same_size"}


@dataclass
class Work:
    """What a piece of the model costs per micro-batch, forward and backward together."""
    matmul_flops: float = 0.0
    attention_flops: float = 0.0
    memory_bytes: float = 0.0          # read + written by kernels other than matmuls and attention
    kernels: int = 0                   # operator launches (dispatch overhead on CPU, launches on GPU)
    matmuls: int = 0                   # of which GEMMs (their mean size sets a CPU's GEMM rate)
    collectives: Counter = field(default_factory=Counter)   # tp collective -> calls
    collective_bytes: Counter = field(default_factory=Counter)  # -> buffer bytes (parallel.comm's)
    saved_bytes: float = 0.0           # what forward leaves alive for backward (and its output)
    # the most bytes backward holds at once beyond that (its working set: the gradients in flight,
    # a recomputed forward's activations); the largest piece's, not a sum
    backward_bytes: float = 0.0

    def _combine(self, other: Work, sign: int) -> Work:
        def counter(a: Counter, b: Counter) -> Counter:
            return Counter({k: a.get(k, 0) + sign * b.get(k, 0) for k in set(a) | set(b)})
        return Work(self.matmul_flops + sign * other.matmul_flops, self.attention_flops + sign * other.attention_flops,
                    self.memory_bytes + sign * other.memory_bytes, self.kernels + sign * other.kernels,
                    self.matmuls + sign * other.matmuls, counter(self.collectives, other.collectives),
                    counter(self.collective_bytes, other.collective_bytes),
                    self.saved_bytes + sign * other.saved_bytes,
                    max(self.backward_bytes, other.backward_bytes) if sign > 0 else self.backward_bytes)

    def __add__(self, other: Work) -> Work:
        return self._combine(other, 1)

    def __sub__(self, other: Work) -> Work:
        return self._combine(other, -1)

    def scaled(self, n: float) -> Work:
        return Work(self.matmul_flops * n, self.attention_flops * n, self.memory_bytes * n, self.kernels * n,
                    self.matmuls * n, Counter({k: v * n for k, v in self.collectives.items()}),
                    Counter({k: v * n for k, v in self.collective_bytes.items()}), self.saved_bytes * n,
                    self.backward_bytes)


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(tree)
               if isinstance(t, torch.Tensor))


class _CountOps(TorchDispatchMode):
    def __init__(self, work: Work):
        super().__init__()
        self.work = work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        w = self.work
        if func in MATMULS:
            a, b = args[-2], args[-1]  # addmm(bias, a, b): the last two are the factors
            w.matmul_flops += 2.0 * a.numel() * b.shape[-1]
            w.matmuls += 1
        elif func is FLASH_FWD:
            q, k = args[0], args[1]  # [b, heads, s, d]: causal half of 4·b·heads·s²·d
            w.attention_flops += 2.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        elif func is FLASH_BWD:
            q, k = args[1], args[2]
            w.attention_flops += FLASH_BACKWARD_RATIO * 2.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] \
                * q.shape[3]
        elif func.namespace == "c10d" or name in FREE:
            return out
        else:
            w.memory_bytes += _nbytes(args) + _nbytes(kwargs) + _nbytes(out)
        w.kernels += 1
        return out


_sdpa = F.scaled_dot_product_attention


def _flash_sdpa(q, k, v, *args, is_causal=False, **kwargs):
    """Causal SDPA → the flash kernel (what a GPU runs), so that it is counted as one fused op."""
    if is_causal and not args and not kwargs:
        return _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]
    return _sdpa(q, k, v, *args, is_causal=is_causal, **kwargs)


def _run(model: Transformer, cfg: LlamaConfig, micro_batch: int, seq_len: int, tp: int, sp: bool, dtype,
         first: bool, last: bool) -> Work:
    work = Work()
    if first:
        x = torch.zeros(micro_batch, seq_len, dtype=torch.long)
    else:
        x = torch.randn(micro_batch, seq_len // tp if sp else seq_len, cfg.dim, dtype=dtype, requires_grad=True)
    targets = torch.zeros(micro_batch, seq_len, dtype=torch.long) if last else None
    for p in model.parameters():  # the trainer's buckets take each gradient as it comes (counted apart)
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    comm.reset_traffic()
    live = PeakTensorMemory()
    with mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa), _CountOps(work), live:
        out = model(x, targets) if last else model(x)
        loss = out if last else out.float().sum()
        work.saved_bytes = live.reset_peak()
        loss.backward()
    work.backward_bytes = live.peak - work.saved_bytes
    work.collectives.update({k: v for k, v in comm.CALLS.items() if k != "loss_all_reduce"})
    work.collective_bytes.update({k: v for k, v in comm.TRAFFIC.items() if k != "loss_all_reduce"})
    comm.reset_traffic()
    return work


def profile(cfg: LlamaConfig, tp: int, sp: bool, recompute: str, micro_batch: int, seq_len: int,
            dtype: torch.dtype = torch.bfloat16, sp_keep_gathered: bool = False,
            vocab_pad_multiple: int = 1, device: str = "cuda") -> dict[str, Work]:
    """{"layer": one transformer layer, "first": the first stage's extra (embedding),
    "last": the last stage's extra (final norm, output layer, loss)}, per micro-batch and tp rank,
    as the model runs on `device` (the loss works through its logits in chunks sized per device).
    Needs no process group: it makes (and removes) a fake one of tp ranks."""
    return _profile(dataclasses.replace(cfg, n_layers=1).key(), tp, sp and tp > 1, recompute,
                    micro_batch, seq_len, dtype, sp and sp_keep_gathered, vocab_pad_multiple, device)


@functools.lru_cache(maxsize=256)
def _profile(cfg_fields: tuple, tp, sp, recompute, micro_batch, seq_len, dtype, sp_keep_gathered,
             vocab_pad_multiple, device) -> dict[str, Work]:
    from llama.fake_world import fake_world
    one = LlamaConfig.from_key(cfg_fields)
    kw = dict(attention="sdpa", recompute=recompute, dtype=dtype, vocab_pad_multiple=vocab_pad_multiple)
    chunk = {"meta": loss.CHUNK_ENTRIES.get(device, loss.DEFAULT_CHUNK_ENTRIES)}
    with fake_world(tp, 0), torch.device("meta"), mock.patch.dict(loss.CHUNK_ENTRIES, chunk):
        topo = build_topology(tp, 1, 1)
        tpc = TensorParallel(topo.tp_group, sp=sp, keep_gathered=sp_keep_gathered)

        def run(first: bool, last: bool) -> Work:
            model = Transformer(one, tp=tpc, layer_ids=[0], first_stage=first, last_stage=last, **kw)
            return _run(model, one, micro_batch, seq_len, tp, sp, dtype, first, last)
        layer = run(False, False)
        return {"layer": layer, "first": run(True, False) - layer, "last": run(False, True) - layer}
